"""How the scheduler's stream handler threads are shared (pure; the service holds one StreamSlots).

Every open task.work or task.wait stream holds a handler thread for as long as it is open, so the
streams an agent may open are bounded twice: one session's agents hold at most `per_session`, and
all streams at most `total`. A session's cap alone leaves the total to a few hostile sessions (their
workers opening task.work under new worker ids, their assistants task.wait storms), and then no other
session's worker could take its tasks. So `work_reserve` of the total is kept for task.work: once the
rest is taken, a session's worker may still open one stream out of the reserve (one per session, so a
hostile session takes one of it at most), and host workers may always.
"""

from __future__ import annotations

import collections
import contextlib
import threading
from typing import Iterator

from baaaht.bus.errors import exhausted

HOST = None  # the scope of a host caller (scope.py scope_of)


class StreamSlots:
    def __init__(self, total: int, per_session: int, work_reserve: int):
        self.total, self.per_session, self.work_reserve = total, per_session, work_reserve
        self._shared = 0  # streams held outside the reserve
        self._reserved: collections.Counter[str | None] = collections.Counter()  # by scope
        self._by_session: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    @property
    def open(self) -> int:
        return self._shared + sum(self._reserved.values())

    @contextlib.contextmanager
    def hold(self, what: str, scope: str | None, *, work: bool) -> Iterator[None]:
        """A slot for one stream of `scope` (a session, or HOST) for as long as the block runs;
        RESOURCE_EXHAUSTED naming the limit when there is none. `work`: a task.work stream."""
        reserved = self._take(what, scope, work)
        try:
            yield
        finally:
            self._give_back(scope, reserved)

    def _take(self, what: str, scope: str | None, work: bool) -> bool:
        with self._lock:
            if scope is not HOST and self._by_session[scope] >= self.per_session:
                raise exhausted(
                    f"the agents of session {scope} hold {self.per_session} streams, a session's most: the "
                    f"scheduler opens no more to {what} until one ends",
                    session_id=scope,
                    limit=self.per_session,
                )
            if self._shared < self.total - self.work_reserve:
                reserved = False
            elif work and self._may_reserve(scope):
                reserved = True
            else:
                raise exhausted(f"{self.open} streams are open: the scheduler opens no more to {what}")
            if reserved:
                self._reserved[scope] += 1
            else:
                self._shared += 1
            if scope is not HOST:
                self._by_session[scope] += 1
            return reserved

    def _may_reserve(self, scope: str | None) -> bool:
        held = sum(self._reserved.values())
        return held < self.work_reserve and (scope is HOST or not self._reserved[scope])

    def _give_back(self, scope: str | None, reserved: bool) -> None:
        with self._lock:
            if reserved:
                self._reserved[scope] -= 1
                if not self._reserved[scope]:
                    del self._reserved[scope]
            else:
                self._shared -= 1
            if scope is not HOST:
                self._by_session[scope] -= 1
                if not self._by_session[scope]:
                    del self._by_session[scope]
