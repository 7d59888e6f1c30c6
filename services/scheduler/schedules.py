"""When a schedule runs next, and what is done about runs missed while the scheduler was down (pure).

Cron expressions are read by `cronsim` (Healthchecks.io's parser: no dependencies, maintained, follows
Debian cron's rules, including day-of-month OR day-of-week, and refuses what cron would refuse, naming
the field). Cron times are UTC. An interval schedule runs at created_at + k * every.
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass

from cronsim import CronSim, CronSimError

from baaaht.bus.errors import invalid
from baaaht.schemas.tasks import ScheduleInfo

MIN_EVERY = 0.01  # seconds: below this an interval schedule would be a busy loop


def check(cron: str, every: float) -> None:
    """Refuse a schedule that is not exactly one of a valid cron expression and a positive interval."""
    if bool(cron) == bool(every):
        raise invalid("a schedule needs exactly one of cron and every", field="cron" if cron else "every")
    if every and every < MIN_EVERY:
        raise invalid(f"every must be at least {MIN_EVERY}s, not {every}", field="every")
    if cron:
        try:
            CronSim(cron, datetime.datetime.now(datetime.timezone.utc))
        except CronSimError as exc:
            raise invalid(f"invalid cron expression {cron!r}: {exc}", field="cron") from None


def next_after(schedule: ScheduleInfo, t: float) -> float:
    """The first run time strictly after `t`."""
    if schedule.every:
        k = math.floor((t - schedule.created_at) / schedule.every) + 1
        return schedule.created_at + max(k, 1) * schedule.every
    start = datetime.datetime.fromtimestamp(t, datetime.timezone.utc)
    return next(iter(CronSim(schedule.cron, start))).timestamp()


def latest_at_or_before(schedule: ScheduleInfo, due: float, now: float) -> float:
    """The latest run time in [due, now], `due` being a run time itself."""
    latest = due
    while (following := next_after(schedule, latest)) <= now:
        if schedule.every:  # jump straight there: an interval schedule may have missed millions
            k = math.floor((now - schedule.created_at) / schedule.every)
            return schedule.created_at + k * schedule.every
        latest = following
    return latest


@dataclass(frozen=True)
class Fire:
    run: bool  # whether a run is due now (one, however many were missed)
    run_time: float  # the run time it stands for
    next_run_at: float


def fire(schedule: ScheduleInfo, now: float, up_since: float) -> Fire:
    """The schedule's next_run_at has come: one run for the latest run time passed, and the next run
    time after now. A run time that passed while the scheduler was down (before `up_since`) is made up
    only when it is less than the catch-up window ago; one that passed while it was up always runs
    (its timer fired late, under load)."""
    latest = latest_at_or_before(schedule, schedule.next_run_at, now)
    run = latest >= up_since or now - latest <= schedule.catch_up_window
    return Fire(run, latest, next_after(schedule, now))
