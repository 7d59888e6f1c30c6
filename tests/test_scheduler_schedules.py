"""Schedules end to end: every overlap policy, and the catch-up after the scheduler was down."""

from __future__ import annotations

import signal
import time

import pytest

from baaaht.bus.testing import wait_for
from baaaht.schemas.tasks import TaskList, TaskScheduleAdd, TaskScheduleList, TaskSchedulePause
from tests.scheduler_doubles import payload, start_scheduler
from tests.test_scheduler_bus import overlapping


@pytest.fixture
def scheduler(make_host):
    return start_scheduler(make_host)


def runs_of(scheduler, schedule_id: str) -> list:
    return [t for t in scheduler.client.call(TaskList(limit=1000)).tasks if t.schedule_id == schedule_id]


def finished_runs(scheduler, schedule_id: str, count: int) -> list[tuple[float, float]]:
    """(start, end) of the first `count` runs of a schedule, once they have finished."""

    def finished():
        ids = [t.id for t in runs_of(scheduler, schedule_id)]
        starts = {r["task"]: r["time"] for r in scheduler.records("start") if r["task"] in ids}
        ends = {r["task"]: r["time"] for r in scheduler.records("done") if r["task"] in ids}
        done = [(starts[t], ends[t]) for t in ids if t in ends]
        return sorted(done)[:count] if len(done) >= count else None

    return wait_for(finished, 30, interval=0.1, what=f"{count} runs of schedule {schedule_id}")


def add(scheduler, **fields):
    return scheduler.client.call(TaskScheduleAdd(queue="sched", **fields))


def pause(scheduler, schedule_id: str) -> None:
    scheduler.client.call(TaskSchedulePause(id=schedule_id))


def test_overlap_skip_never_runs_two_at_once_and_drops_the_runs_in_between(scheduler):
    scheduler.start_worker("sched", slots=4)
    schedule = add(scheduler, every=1.0, task_type="sleep", payload=payload({"seconds": 1.2}), overlap="skip")
    runs = finished_runs(scheduler, schedule.id, 2)
    pause(scheduler, schedule.id)
    assert not overlapping(runs)
    assert runs[1][0] - runs[0][1] >= 0.5  # the run due at 1 s was skipped: the next came at 2 s


def test_overlap_buffer_one_runs_the_next_as_soon_as_the_last_ends(scheduler):
    scheduler.start_worker("sched", slots=4)
    schedule = add(
        scheduler, every=1.0, task_type="sleep", payload=payload({"seconds": 1.2}), overlap="buffer_one"
    )
    runs = finished_runs(scheduler, schedule.id, 2)
    pause(scheduler, schedule.id)
    assert not overlapping(runs)
    assert runs[1][0] - runs[0][1] < 0.5  # buffered while the first ran (at 1 s), started when it ended


def test_overlap_allow_runs_them_side_by_side(scheduler):
    scheduler.start_worker("sched", slots=4)
    schedule = add(
        scheduler, every=0.3, task_type="sleep", payload=payload({"seconds": 1.0}), overlap="allow"
    )
    runs = finished_runs(scheduler, schedule.id, 2)
    pause(scheduler, schedule.id)
    assert overlapping(runs)


def test_after_downtime_one_run_makes_up_for_those_missed_within_the_window(scheduler):
    scheduler.start_worker("sched", slots=2)  # the runs finish: "skip" skips none for an overlap
    # overlap "allow": a run still unfinished when the scheduler was killed must not skip the catch-up
    caught_up = add(scheduler, every=2.0, task_type="noop", catch_up_window=60.0, overlap="allow")
    narrow = add(scheduler, every=2.0, task_type="noop", catch_up_window=0.1, overlap="allow")
    wait_for(
        lambda: runs_of(scheduler, caught_up.id) and runs_of(scheduler, narrow.id), 10, what="first runs"
    )
    scheduler.host.kill("scheduler", signal.SIGKILL)
    time.sleep(5.0)  # the downtime itself: runs at two or three run times are missed
    restarted = time.time()
    scheduler.start()

    def handled() -> (
        dict | None
    ):  # the restarted engine has dealt with the missed runs (a read may come first)
        listed = {s.id: s for s in scheduler.client.call(TaskScheduleList()).schedules}
        return listed if all(s.next_run_at > restarted for s in listed.values()) else None

    listed = wait_for(handled, 15, what="the restarted scheduler to take up its schedules")
    # Every run after the restart and before the next run time is a catch-up run.
    next_runs = {s_id: listed[s_id].next_run_at for s_id in (caught_up.id, narrow.id)}
    wait_for(lambda: time.time() > max(next_runs.values()) + 0.2, 5, what="the next run times to pass")

    def catch_up_runs(schedule_id: str) -> list:
        return [
            t for t in runs_of(scheduler, schedule_id) if restarted <= t.created_at < next_runs[schedule_id]
        ]

    assert len(catch_up_runs(caught_up.id)) == 1  # one, not one per missed run time
    assert catch_up_runs(narrow.id) == []
