"""What happens after a failed attempt, with Temporal's retry semantics (pure).

The n-th retry waits min(initial_interval * backoff_coefficient ** (n - 1), maximum_interval); with full
jitter (the AWS kind) a uniform random part of that, so that many tasks failing together do not come
back together. An error type in `non_retryable_errors`, or a failure the worker marks non-retryable,
fails the task at once; a task out of attempts is dead.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Literal

from baaaht.schemas.tasks import RetryPolicy


def interval(policy: RetryPolicy, retry: int) -> float:
    """The backoff before the `retry`-th retry (1 for the first), before jitter."""
    return min(policy.maximum_interval, policy.initial_interval * policy.backoff_coefficient ** (retry - 1))


@dataclass(frozen=True)
class Verdict:
    action: Literal["retry", "fail", "dead"]
    delay: float = 0.0  # of a retry


def after_failure(
    policy: RetryPolicy,
    attempts: int,
    error_type: str,
    non_retryable: bool = False,
    uniform: Callable[[float, float], float] = random.uniform,
) -> Verdict:
    """The verdict after the `attempts`-th attempt (counted since the last requeue) failed."""
    if non_retryable or error_type in policy.non_retryable_errors:
        return Verdict("fail")
    if attempts >= policy.maximum_attempts:
        return Verdict("dead")
    wait = interval(policy, attempts)
    return Verdict("retry", uniform(0.0, wait) if policy.jitter == "full" else wait)
