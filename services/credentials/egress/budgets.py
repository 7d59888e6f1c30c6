"""Per-session budgets: calls admitted and LLM tokens used, against the configured caps.

A call is admitted (and counted) before it goes upstream, so concurrent calls cannot pass a request
cap together; tokens are known only when a response ends, so a session may pass its token cap by the
calls in flight when it is reached, never by a call admitted after. Thread-safe: the proxy's loop
writes, `credential.usage` reads from a handler thread.

The totals outlive the process: they start from what was saved (`restore`), and `take_changes` hands
the sessions changed since its last call to whoever saves them (usage_store.py, in batches); a save
that fails gives them back with `put_back`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

import msgspec

from baaaht.schemas.egress import SessionUsage

from .refusals import Refused
from .usage import Usage

FORGOTTEN_KEPT = 10_000  # deleted sessions remembered (oldest first out)


class Budgets:
    def __init__(self, request_cap: int, token_cap: int):
        self.request_cap = request_cap
        self.token_cap = token_cap
        self._lock = threading.Lock()
        self._sessions: dict[str, SessionUsage] = {}
        self._changed: set[str] = set()
        # Sessions deleted since the start: a call still running at the deletion, or one of its agent's
        # last, must not bring the totals back (dict: insertion order, the oldest forgotten first).
        self._forgotten: dict[str, None] = {}

    def restore(self, known: Iterable[SessionUsage]) -> None:
        """Start from saved totals (before serving); the caps are today's configuration."""
        with self._lock:
            for usage in known:
                self._sessions[usage.session_id] = msgspec.structs.replace(
                    usage, request_cap=self.request_cap, token_cap=self.token_cap
                )

    def _of(self, session_id: str) -> SessionUsage | None:
        """The session's totals, made at its first call; None for a session deleted (it counts no more)."""
        if session_id in self._forgotten:
            return None
        self._changed.add(session_id)  # every caller is about to change it
        usage = self._sessions.get(session_id)
        if usage is None:
            usage = self._sessions[session_id] = SessionUsage(
                session_id=session_id, request_cap=self.request_cap, token_cap=self.token_cap
            )
        return usage

    def take_changes(self) -> list[SessionUsage]:
        """Copies of the sessions changed since the last call (their current totals)."""
        with self._lock:
            changed = [msgspec.structs.replace(self._sessions[name]) for name in sorted(self._changed)]
            self._changed.clear()
            return changed

    def put_back(self, changes: Iterable[SessionUsage]) -> None:
        """Changes whose save failed: the next take_changes hands them out again (with newer totals)."""
        with self._lock:
            self._changed.update(usage.session_id for usage in changes)

    def forget(self, session_id: str) -> None:
        """The session was deleted: its totals go, and a call of it that ends later does not count."""
        with self._lock:
            self._sessions.pop(session_id, None)
            self._changed.discard(session_id)
            self._forgotten[session_id] = None
            if len(self._forgotten) > FORGOTTEN_KEPT:
                del self._forgotten[next(iter(self._forgotten))]

    def admit(self, session_id: str) -> None:
        """Count one call of the session, or Refused (429) naming the budget it is past."""
        with self._lock:
            usage = self._of(session_id)
            if usage is None:
                raise Refused(403, "session", f"session {session_id!r} was deleted")
            if self.request_cap and usage.requests >= self.request_cap:
                raise Refused(
                    429,
                    "budget",
                    f"session {session_id!r} used its request budget ({usage.requests} of "
                    f"{self.request_cap} calls, egress.session_requests)",
                )
            tokens = usage.input_tokens + usage.output_tokens
            if self.token_cap and tokens >= self.token_cap:
                raise Refused(
                    429,
                    "budget",
                    f"session {session_id!r} used its token budget ({tokens} of {self.token_cap} "
                    "tokens, egress.session_tokens)",
                )
            usage.requests += 1

    def refused(self, session_id: str) -> None:
        with self._lock:
            usage = self._of(session_id)
            if usage is not None:
                usage.refused += 1

    def record(self, session_id: str, used: Usage, bytes_out: int, bytes_in: int) -> SessionUsage:
        """Add a finished call's usage; the session's totals after it (of that call alone when the session
        was deleted while it ran: kept for its journal line, not stored)."""
        with self._lock:
            usage = self._of(session_id) or SessionUsage(
                session_id=session_id, request_cap=self.request_cap, token_cap=self.token_cap
            )
            usage.input_tokens += used.input_tokens
            usage.output_tokens += used.output_tokens
            usage.bytes_out += bytes_out
            usage.bytes_in += bytes_in
            return msgspec.structs.replace(usage)

    def sessions(self, session_id: str = "") -> list[SessionUsage]:
        with self._lock:
            chosen = [self._sessions[session_id]] if session_id in self._sessions else []
            everything = sorted(self._sessions.values(), key=lambda usage: usage.session_id)
            return [msgspec.structs.replace(usage) for usage in (chosen if session_id else everything)]
