"""Refused calls, recorded one by one up to a rate per caller and summed up past it.

A refused call reaches no upstream and spends no budget, so nothing else bounds how many an agent
makes: one looping on an unknown route made ~700 a second, each an fsync'd audit line and an
`egress.refused` event, which grew the audit log without bound and evicted the host's event history
(10,000 events) in seconds. So each caller has a token bucket of `egress.refusals_per_minute`: a
refusal within it is recorded as before; past it the agent gets the same answer, but the refusal is
only counted, and once a period each caller's counted refusals of each kind become one summary (an
audit line with `suppressed`, an `egress.refusals_suppressed` event). Like the broker's
`bus.auth.failed` (bus/auth_failures.py). Calls that reached an upstream never come here: they cost
money, the budgets bound them, and each is recorded.

The caller is the call's session (every container and connection of it: neither opening connections
nor starting workers escapes the bucket), or its container when it has no identity. Pure (the caller
passes its monotonic clock); not thread-safe: only the proxy's event loop calls it.
"""

from __future__ import annotations

from baaaht.common.rate import TokenBucket

from .journal import Call, Suppressed


def caller_of(call: Call) -> str:
    """Whose bucket a refusal is taken from: its session's, else its container's (empty: no container)."""
    if call.identity is not None:
        return f"session:{call.identity.session_id}"
    return f"container:{call.container_id}"


class RefusalLimit:
    def __init__(self, per_minute: int):
        self.per_minute = per_minute
        self._buckets: dict[str, TokenBucket] = {}
        self._suppressed: dict[tuple[str, str, str], Suppressed] = {}  # (caller, container, kind)

    def records(self, call: Call, now: float) -> bool:
        """Whether this refused call is recorded one by one; if not, it is counted for the next summary."""
        caller = caller_of(call)
        bucket = self._buckets.get(caller)
        if bucket is None:
            bucket = self._buckets[caller] = TokenBucket(self.per_minute / 60.0, self.per_minute)
        if bucket.take(1, now):
            return True
        key = (caller, call.container_id, call.refused)
        held = self._suppressed.get(key)
        if held is None:
            self._suppressed[key] = Suppressed(last=call, count=1, since=call.started_at)
        else:
            held.last, held.count = call, held.count + 1
        return False

    def summaries(self, now: float) -> list[Suppressed]:
        """The refusals counted since the last call, one summary per caller, container and kind; the
        buckets that have filled up again are forgotten (a new one would be the same)."""
        due, self._suppressed = list(self._suppressed.values()), {}
        for caller in [c for c, bucket in self._buckets.items() if bucket.full(now)]:
            del self._buckets[caller]
        return due
