"""Publishing session events in commit order.

The bus client keeps the order of one thread's messages only: each thread has its own pipe into
the connection. Handlers commit on many threads, so their events are queued (in commit order,
under the store's lock) and published by one thread.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Callable

from baaaht.schemas.base import Event, topic_of

log = logging.getLogger("baaaht.session.events")

_STOP = object()


class OrderedPublisher:
    def __init__(self, publish: Callable[[Event, str], None]):
        self._publish = publish
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="session-events", daemon=True)
        self._thread.start()

    def publish(self, event: Event, subtopic: str = "") -> None:
        self._queue.put((event, subtopic))

    def flush(self, timeout: float) -> bool:
        """Wait until everything queued so far is published; False if that took too long."""
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)

    def close(self, timeout: float) -> None:
        """Publish what is queued, then stop."""
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def _run(self) -> None:
        # Blocks until there is work; close() always queues _STOP, so this ends.
        while (item := self._queue.get()) is not _STOP:
            if isinstance(item, threading.Event):
                item.set()
                continue
            event, subtopic = item
            try:
                self._publish(event, subtopic)
            except Exception:
                log.exception("publishing an event failed", extra={"topic": topic_of(type(event))})
