"""Per-session quotas: how much of something the agents of one session may cause per minute.

One token bucket per (session, kind), holding the kind's per-minute limit and refilling at that
rate, so a session may burst up to its limit and then goes on at the limit's pace; other
sessions are untouched. What one call causes in several kinds is taken all or none. Pure (the
caller passes its monotonic clock); its own lock makes it safe to share between a service's threads.

Kinds and their limits (the `limits` config section):
- `messages`: session messages an agent adds (session service, `limits.session_messages_per_minute`).
- `message_bytes`: their bytes, content and metadata (session service,
  `limits.session_message_bytes_per_minute`): each is a host event kept for replay with its content.
- `cancels`: turn cancels an agent asks for (session service, `limits.session_cancels_per_minute`).
- `tasks`: tasks an agent's submits create, each counted as the attempts its retry policy allows
  (scheduler, `limits.session_tasks_per_minute`): cancelled at once they never reach
  scheduler.session_max_unfinished, yet each is a row kept for scheduler.task_retention; failed at once
  by the session's worker, each attempt is events and a rewrite of its row.
Callers charge only what an agent causes: the operator and host services are not limited here.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass

from baaaht.common.rate import TokenBucket
from baaaht.schemas.config import LimitsConfig


@dataclass(frozen=True)
class Quota:
    per_minute: int
    key: str  # the config key that sets it, named in refusals
    unit: str  # what it counts, named in refusals


@dataclass(frozen=True)
class Refusal:
    kind: str  # the quota that refused
    message: str


class SessionQuotas:
    def __init__(self, quotas: dict[str, Quota]):
        self.quotas = quotas
        self.buckets: dict[tuple[str, str], TokenBucket] = {}
        self._lock = threading.Lock()  # handler threads charge while a background task prunes

    @classmethod
    def for_limits(cls, limits: LimitsConfig) -> "SessionQuotas":
        return cls(
            {
                "messages": Quota(
                    limits.session_messages_per_minute, "limits.session_messages_per_minute", "messages"
                ),
                "message_bytes": Quota(
                    int(limits.session_message_bytes_per_minute),
                    "limits.session_message_bytes_per_minute",
                    "bytes of messages",
                ),
                "cancels": Quota(
                    limits.session_cancels_per_minute, "limits.session_cancels_per_minute", "cancels"
                ),
                "tasks": Quota(
                    limits.session_tasks_per_minute, "limits.session_tasks_per_minute", "task attempts"
                ),
            }
        )

    def oversized(self, kind: str, amount: int) -> str | None:
        """Why `amount` of `kind` is more than a whole minute of the quota, so that no wait lets it in
        (callers answer INVALID_ARGUMENT, not the 'try again later' of `refusal`), or None."""
        quota = self.quotas[kind]
        if amount <= quota.per_minute:
            return None
        return (
            f"{amount} {quota.unit} at once are more than {quota.key} allows in a minute ({quota.per_minute})"
        )

    def refusal(self, session_id: str, amounts: Mapping[str, int], now: float) -> Refusal | None:
        """None when the session may cause every amount of its kind now (and all are counted), else why
        not (and none is: a refused message spends neither its count nor its bytes). Each amount is at
        most its quota's minute (`oversized`)."""
        with self._lock:
            buckets = {kind: self._bucket(session_id, kind) for kind in amounts}
            for kind, amount in amounts.items():
                bucket = buckets[kind]
                if not bucket.holds(amount, now):
                    quota, wait = self.quotas[kind], (amount - bucket.tokens) / bucket.rate
                    return Refusal(
                        kind,
                        f"session {session_id} has had its {quota.per_minute} {quota.unit} a minute"
                        f" ({quota.key}): try again in {wait:.1f}s (this asks for {amount})",
                    )
            for kind, amount in amounts.items():
                buckets[kind].take(amount, now)
            return None

    def _bucket(self, session_id: str, kind: str) -> TokenBucket:
        bucket = self.buckets.get((session_id, kind))
        if bucket is None:
            quota = self.quotas[kind]
            bucket = self.buckets[(session_id, kind)] = TokenBucket(quota.per_minute / 60.0, quota.per_minute)
        return bucket

    def prune(self, now: float) -> None:
        """Forget the buckets that have filled up again: a new one would be the same."""
        with self._lock:
            for key in [k for k, bucket in self.buckets.items() if bucket.full(now)]:
                del self.buckets[key]
