"""Per-session quotas: how much of something the agents of one session may cause per minute.

One token bucket per (session, kind), holding the kind's per-minute limit and refilling at that
rate, so a session may burst up to its limit and then goes on at the limit's pace; other
sessions are untouched. Pure (the caller passes its monotonic clock) and not thread-safe: a
service calls it under its own lock.

Kinds and their limits (the `limits` config section):
- `messages`: session messages an agent adds (session service, `limits.session_messages_per_minute`).
- `message_bytes`: their bytes, content and metadata (session service,
  `limits.session_message_bytes_per_minute`): each is a host event kept for replay with its content.
- `cancels`: turn cancels an agent asks for (session service, `limits.session_cancels_per_minute`).
- `tasks`: tasks an agent submits, each counted as the attempts its retry policy allows (scheduler,
  `limits.session_tasks_per_minute`): cancelled at once they never reach
  scheduler.session_max_unfinished, yet each is a row kept for scheduler.task_retention; failed at once
  by the session's worker, each attempt is events and a rewrite of its row.
Callers charge only what an agent causes: the operator and host services are not limited here.
"""

from __future__ import annotations

from dataclasses import dataclass

from baaaht.common.rate import TokenBucket
from baaaht.schemas.config import LimitsConfig


@dataclass(frozen=True)
class Quota:
    per_minute: int
    key: str  # the config key that sets it, named in refusals


class SessionQuotas:
    def __init__(self, quotas: dict[str, Quota]):
        self.quotas = quotas
        self.buckets: dict[tuple[str, str], TokenBucket] = {}

    @classmethod
    def for_limits(cls, limits: LimitsConfig) -> "SessionQuotas":
        return cls(
            {
                "messages": Quota(limits.session_messages_per_minute, "limits.session_messages_per_minute"),
                "message_bytes": Quota(
                    int(limits.session_message_bytes_per_minute), "limits.session_message_bytes_per_minute"
                ),
                "cancels": Quota(limits.session_cancels_per_minute, "limits.session_cancels_per_minute"),
                "tasks": Quota(limits.session_tasks_per_minute, "limits.session_tasks_per_minute"),
            }
        )

    def refusal(self, session_id: str, kind: str, now: float, amount: int = 1) -> str | None:
        """None when the session may cause `amount` more of `kind` now (and it is counted), else why not."""
        quota = self.quotas[kind]
        if amount > quota.per_minute:
            return f"{amount} {kind} at once are more than {quota.key} ({quota.per_minute} a minute) allows"
        bucket = self.buckets.get((session_id, kind))
        if bucket is None:
            bucket = self.buckets[(session_id, kind)] = TokenBucket(quota.per_minute / 60.0, quota.per_minute)
        if bucket.take(amount, now):
            return None
        return (
            f"session {session_id} has had its {quota.per_minute} {kind} a minute ({quota.key}):"
            f" try again in {(amount - bucket.tokens) / bucket.rate:.1f}s"
        )

    def prune(self, now: float) -> None:
        """Forget the buckets that have filled up again: a new one would be the same."""
        for key in [k for k, bucket in self.buckets.items() if bucket.full(now)]:
            del self.buckets[key]
