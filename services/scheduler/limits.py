"""Concurrency and rate limits of queues and sessions (pure: every method takes `now`, monotonic)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenBucket:
    """`rate` starts per second, holding at most one second's worth (at least one start)."""

    rate: float
    tokens: float = 0.0
    updated: float | None = None

    @property
    def capacity(self) -> float:
        return max(1.0, self.rate)

    def _refill(self, now: float) -> None:
        if self.updated is None:
            self.tokens = self.capacity
        else:
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    def available(self, now: float) -> bool:
        self._refill(now)
        return self.tokens >= 1.0

    def take(self, now: float) -> None:
        self._refill(now)
        self.tokens -= 1.0

    def next_token_at(self, now: float) -> float:
        self._refill(now)
        return now + max(0.0, (1.0 - self.tokens) / self.rate)


@dataclass
class Limit:
    """How many may run at once (0: any) and how fast they may start (0: any)."""

    max_running: int = 0
    rate: float = 0.0
    running: int = 0
    bucket: TokenBucket | None = field(default=None)

    def __post_init__(self) -> None:
        if self.rate > 0 and self.bucket is None:
            self.bucket = TokenBucket(self.rate)

    def allows(self, now: float) -> bool:
        if self.max_running and self.running >= self.max_running:
            return False
        return self.bucket is None or self.bucket.available(now)

    def started(self, now: float) -> None:
        self.running += 1
        if self.bucket is not None:
            self.bucket.take(now)

    def ended(self) -> None:
        self.running = max(0, self.running - 1)

    def blocked_until(self, now: float) -> float | None:
        """When a start may be allowed again by the rate alone (None: not blocked by the rate)."""
        if self.bucket is None or self.bucket.available(now):
            return None
        return self.bucket.next_token_at(now)


class Limits:
    """The limit of every queue (from the config) and of every session (one setting for all)."""

    def __init__(
        self,
        queue_max_running: dict[str, int],
        queue_rate: dict[str, float],
        session_max_running: int,
        session_rate: float,
    ):
        self.queue_max_running = queue_max_running
        self.queue_rate = queue_rate
        self.session_max_running = session_max_running
        self.session_rate = session_rate
        self.queues: dict[str, Limit] = {}
        self.sessions: dict[str, Limit] = {}

    def queue(self, name: str) -> Limit:
        limit = self.queues.get(name)
        if limit is None:
            limit = self.queues[name] = Limit(
                self.queue_max_running.get(name, 0), self.queue_rate.get(name, 0.0)
            )
        return limit

    def session(self, session_id: str) -> Limit | None:
        if not session_id or not (self.session_max_running or self.session_rate):
            return None
        limit = self.sessions.get(session_id)
        if limit is None:
            limit = self.sessions[session_id] = Limit(self.session_max_running, self.session_rate)
        return limit

    def allows(self, queue: str, session_id: str, now: float) -> bool:
        session = self.session(session_id)
        return self.queue(queue).allows(now) and (session is None or session.allows(now))

    def started(self, queue: str, session_id: str, now: float) -> None:
        self.queue(queue).started(now)
        if (session := self.session(session_id)) is not None:
            session.started(now)

    def ended(self, queue: str, session_id: str) -> None:
        self.queue(queue).ended()
        if (session := self.session(session_id)) is not None:
            session.ended()

    def forget_session(self, session_id: str) -> None:
        self.sessions.pop(session_id, None)

    def blocked_until(self, queue: str, session_id: str, now: float) -> float | None:
        """When a rate limit lets `queue`/`session_id` start again, if a rate is what blocks it."""
        session = self.session(session_id)
        times = [self.queue(queue).blocked_until(now), session.blocked_until(now) if session else None]
        known = [t for t in times if t is not None]
        return max(known) if known else None
