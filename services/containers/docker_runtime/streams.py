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
        self._items = items
        self._what = what
        self._closed = threading.Event()
        self._reading = False
        self._lock = threading.Lock()  # close() and the start of the reading decide who closes the response

    def __iter__(self) -> Iterator[T]:
        with self._lock:
            if self._closed.is_set():  # closed before the first read: nothing more is read
                return
            self._reading = True
        try:
            yield from self._items
        except (OSError, urllib3.exceptions.HTTPError, requests.exceptions.RequestException) as exc:
            if not self._closed.is_set():
                raise EngineUnavailable(f"{self._what}: the engine connection broke: {exc}") from None
        finally:
            self._closed.set()
            self._response.close()

    def close(self) -> None:
        """Safe from any thread: it only shuts the socket down; the reading thread, seeing the end of
        the data, closes the response itself (closing it here would race with that read)."""
        with self._lock:
            if self._closed.is_set():
                return
            self._closed.set()
            shutdown_socket(self._response)
            if not self._reading:
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
