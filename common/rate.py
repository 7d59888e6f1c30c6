"""Token buckets: how much of something a party may do over time, with `now` passed in.

A bucket holds up to `burst` tokens and gains `rate` tokens a second; a take of more than it holds
is refused and takes nothing, so a party pays nothing for being refused. Pure: the caller passes
its monotonic clock, so limits are tested without sleeping.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class TokenBucket:
    rate: float  # tokens gained per second
    burst: float  # the most it holds, and what a new bucket holds
    tokens: float = field(init=False)
    updated: float | None = field(default=None, init=False)  # when `tokens` was last brought up to date

    def __post_init__(self) -> None:
        self.tokens = self.burst

    def take(self, amount: float, now: float) -> bool:
        """Take `amount` tokens if the bucket holds them; False, with nothing taken, if not."""
        if not self.holds(amount, now):
            return False
        self.tokens -= amount
        return True

    def available(self, now: float) -> float:
        """What it holds now: below zero while it is in debt."""
        self._refill(now)
        return self.tokens

    def charge(self, amount: float, now: float) -> None:
        """Take `amount` tokens whatever the bucket holds: what is missing is a debt the refill pays
        back first (for a cost known only once it is paid)."""
        self._refill(now)
        self.tokens -= amount

    def holds(self, amount: float, now: float) -> bool:
        """Whether a take of `amount` would succeed now (nothing is taken)."""
        self._refill(now)
        return amount <= self.tokens

    def full(self, now: float) -> bool:
        """Whether it holds as much as a new bucket (so forgetting it changes nothing)."""
        self._refill(now)
        return self.tokens >= self.burst

    def _refill(self, now: float) -> None:
        if self.updated is not None and now > self.updated:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        if self.updated is None or now > self.updated:
            self.updated = now
