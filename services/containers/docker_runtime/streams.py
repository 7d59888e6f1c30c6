"""One streaming engine response as a closable iterator (the `Stream` of the runtime protocol)."""

from __future__ import annotations

import socket
import threading
from typing import Generic, Iterable, Iterator, TypeVar

import requests
import urllib3

from baaaht.services.containers.runtime import EngineUnavailable

T = TypeVar("T")


class EngineStream(Generic[T]):
    """Items read from one streaming engine response. `close()` (any thread) shuts its socket, which ends
    the iteration quietly; a connection lost otherwise raises EngineUnavailable."""

    def __init__(self, response: requests.Response, items: Iterable[T], what: str):
        self._response = response
        self._items = iter(items)
        self._what = what
        self._closed = threading.Event()
        self._reading = False  # a thread is inside a read of the response (not between two items)
        self._lock = threading.Lock()  # close() and each read decide who closes the response

    def __iter__(self) -> Iterator[T]:
        try:
            while True:
                with self._lock:
                    if self._closed.is_set():  # closed between two reads: nothing more is read
                        return
                    self._reading = True
                try:
                    item = next(self._items)
                except StopIteration:
                    return
                except (OSError, urllib3.exceptions.HTTPError, requests.exceptions.RequestException) as exc:
                    if not self._closed.is_set():
                        raise EngineUnavailable(f"{self._what}: the engine connection broke: {exc}") from None
                    return
                finally:
                    with self._lock:
                        self._reading = False
                yield item
        finally:
            self._closed.set()
            self._response.close()

    def close(self) -> None:
        """Safe from any thread: during a read it only shuts the socket down, and the reading thread,
        seeing the end of the data, closes the response itself (closing it here would race with that
        read); otherwise (never read, or left between two items) it closes the response here."""
        with self._lock:
            if self._closed.is_set():
                return
            self._closed.set()
            if self._reading:
                shutdown_socket(self._response)
            else:
                self._response.close()


def shutdown_socket(response: requests.Response) -> None:
    # Where the socket sits under requests/urllib3/http.client, as docker's CancellableStream finds it.
    try:
        fp = response.raw._fp.fp
        raw = fp.raw
        sock = getattr(raw, "_sock", None) or getattr(raw, "sock", None)
        if hasattr(sock, "socket"):  # pyopenssl wrapper
            sock = sock.socket
        sock.shutdown(socket.SHUT_RDWR)
    except (AttributeError, OSError):
        pass  # already closed: nothing left to interrupt
