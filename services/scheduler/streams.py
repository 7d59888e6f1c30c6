"""How the scheduler's stream handler threads are shared (pure; the service holds one StreamSlots).

Every open task.work or task.wait stream holds a handler thread for as long as it is open, so the
streams an agent may open are bounded twice: one session's agents hold at most `per_session`, and
all streams at most `total`. A session's cap alone leaves the total to a few hostile sessions (their
workers opening task.work under new worker ids, their assistants task.wait storms), and then no other
session's worker could take its tasks, nor its assistant wait for a tool's result. So a reserve of the
total is kept for each kind of stream (`reserves`: task.work's, task.wait's): once the rest is taken,
a session may still open one stream of each kind out of that kind's reserve (one per session, so a
hostile session takes one of each at most), and host callers as many as the reserve has.
"""

from __future__ import annotations

import collections
import contextlib
import threading
from typing import Iterator, Mapping

from baaaht.bus.errors import exhausted

HOST = None  # the scope of a host caller (scope.py scope_of)


class StreamSlots:
    def __init__(self, total: int, per_session: int, reserves: Mapping[str, int]):
        self.total, self.per_session, self.reserves = total, per_session, dict(reserves)
        self._shared_total = total - sum(self.reserves.values())
        self._shared = 0  # streams held outside the reserves
        # By kind, then by scope: the streams held out of that kind's reserve.
        self._reserved: dict[str, collections.Counter[str | None]] = {
            kind: collections.Counter() for kind in self.reserves
        }
        self._by_session: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    @property
    def open(self) -> int:
        return self._shared + sum(sum(held.values()) for held in self._reserved.values())

    @contextlib.contextmanager
    def hold(self, what: str, scope: str | None, kind: str) -> Iterator[None]:
        """A slot for one stream of `kind` (a key of `reserves`) of `scope` (a session, or HOST) for as
        long as the block runs; RESOURCE_EXHAUSTED naming the limit when there is none."""
        reserved = self._take(what, scope, kind)
        try:
            yield
        finally:
            self._give_back(scope, kind, reserved)

    def _take(self, what: str, scope: str | None, kind: str) -> bool:
        with self._lock:
            if scope is not HOST and self._by_session[scope] >= self.per_session:
                raise exhausted(
                    f"the agents of session {scope} hold {self.per_session} streams, a session's most: the "
                    f"scheduler opens no more to {what} until one ends",
                    session_id=scope,
                    limit=self.per_session,
                )
            if self._shared < self._shared_total:
                reserved = False
            elif self._may_reserve(scope, kind):
                reserved = True
            else:
                raise exhausted(f"{self.open} streams are open: the scheduler opens no more to {what}")
            if reserved:
                self._reserved[kind][scope] += 1
            else:
                self._shared += 1
            if scope is not HOST:
                self._by_session[scope] += 1
            return reserved

    def _may_reserve(self, scope: str | None, kind: str) -> bool:
        held = self._reserved[kind]
        return sum(held.values()) < self.reserves[kind] and (scope is HOST or not held[scope])

    def _give_back(self, scope: str | None, kind: str, reserved: bool) -> None:
        with self._lock:
            if reserved:
                held = self._reserved[kind]
                held[scope] -= 1
                if not held[scope]:
                    del held[scope]
            else:
                self._shared -= 1
            if scope is not HOST:
                self._by_session[scope] -= 1
                if not self._by_session[scope]:
                    del self._by_session[scope]
