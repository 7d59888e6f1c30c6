"""Ends engine streams whose caller has gone: `close_abandoned` (run every TICK as the container
manager's background work) closes every guarded stream whose call was cancelled or whose deadline
passed, which unblocks the handler reading it."""

from __future__ import annotations

import contextlib
import itertools
import threading
from typing import Iterator

from baaaht.bus.service import CallContext
from baaaht.services.containers.runtime import Stream

TICK = 0.05


class Watchdog:
    def __init__(self):
        self._guarded: dict[int, tuple[CallContext, Stream]] = {}
        self._keys = itertools.count()
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def guard(self, ctx: CallContext, stream: Stream) -> Iterator[Stream]:
        """While inside, `stream` is closed as soon as the call is cancelled or out of time; on the way
        out it is closed in any case."""
        key = next(self._keys)
        with self._lock:
            self._guarded[key] = (ctx, stream)
        try:
            yield stream
        finally:
            with self._lock:
                self._guarded.pop(key, None)
            stream.close()

    def close_abandoned(self) -> None:
        with self._lock:
            expired = [
                s for ctx, s in self._guarded.values() if ctx.cancelled.is_set() or ctx.remaining() <= 0
            ]
        for stream in expired:
            stream.close()
