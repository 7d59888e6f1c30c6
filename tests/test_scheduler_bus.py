"""The task scheduler end to end: a real broker, the scheduler process and test worker processes
(tests/services/task_worker.py, on the worker library)."""

from __future__ import annotations

import time

import msgspec
import pytest

from baaaht.bus.testing import error_of, wait_for
from baaaht.schemas.errors import ErrorCode
from baaaht.schemas.tasks import (
    HEARTBEAT_TIMEOUT,
    SCHEDULE_TO_START_TIMEOUT,
    START_TO_CLOSE_TIMEOUT,
    RetryPolicy,
    TaskCancel,
    TaskComplete,
    TaskGet,
    TaskHeartbeat,
    TaskList,
    TaskRequeue,
    TaskScheduleAdd,
    TaskScheduleList,
    TaskState,
    TaskSubmit,
    Timeouts,
)
from tests.scheduler_doubles import payload, start_scheduler

S = TaskState
ONCE = RetryPolicy(maximum_attempts=1)


@pytest.fixture
def scheduler(make_host):
    return start_scheduler(make_host)


def overlapping(intervals: list[tuple[float, float]]) -> bool:
    ordered = sorted(intervals)
    return any(later[0] < earlier[1] for earlier, later in zip(ordered, ordered[1:], strict=False))


def run_intervals(scheduler, task_ids) -> list[tuple[float, float]]:
    starts = {r["task"]: r["time"] for r in scheduler.records("start") if r["task"] in task_ids}
    ends = {r["task"]: r["time"] for r in scheduler.records("done") if r["task"] in task_ids}
    return [(starts[t], ends[t]) for t in task_ids]


def test_a_task_runs_on_a_worker_and_its_result_is_kept(scheduler):
    scheduler.start_worker("q")
    task = scheduler.submit("q", "echo", {"x": 1})
    assert task.state in (S.QUEUED, S.RUNNING)
    done = scheduler.wait_state(task.id)
    assert done.state is S.SUCCEEDED
    assert msgspec.msgpack.decode(done.result) == {"x": 1}
    assert len(done.attempts) == 1 and done.attempts[0].started_at >= done.created_at


def test_the_tasks_leased_to_a_worker_in_one_turn_all_run(scheduler):
    """One submit of 4 is one engine turn: the 4 leases reach the worker in one partial."""
    scheduler.start_worker("q", slots=4)
    first, *rest = (TaskSubmit(queue="q", task_type="echo", payload=payload(n)) for n in range(4))
    answer = scheduler.client.call(msgspec.structs.replace(first, more=rest))
    done = [scheduler.wait_state(t.id) for t in [answer.task, *(m.task for m in answer.more)]]
    assert [(t.state, msgspec.msgpack.decode(t.result), len(t.attempts)) for t in done] == [
        (S.SUCCEEDED, n, 1) for n in range(4)
    ]  # each on its first lease: none was dropped to run again after its lease expired


def test_higher_priority_first_then_older_first(scheduler):
    submitted = [
        scheduler.submit("prio", "noop", priority=p).id for p in (0, 5, 0, 10, -3)
    ]  # no worker yet: all wait
    scheduler.start_worker("prio", slots=1)
    for task_id in submitted:
        scheduler.wait_state(task_id)
    starts = sorted(scheduler.records("start"), key=lambda r: r["time"])
    order = [r["task"] for r in starts]
    assert order == [submitted[3], submitted[1], submitted[0], submitted[2], submitted[4]]


def test_a_delayed_task_waits_its_delay_while_others_run(scheduler):
    scheduler.start_worker("d", slots=2)
    delayed = scheduler.submit("d", "noop", delay=1.0)
    assert delayed.not_before >= delayed.created_at + 1.0
    prompt = scheduler.submit("d", "noop")
    scheduler.wait_state(prompt.id)
    assert scheduler.get(delayed.id).state is S.QUEUED
    scheduler.wait_state(delayed.id)
    started = scheduler.records("start", delayed.id)[0]["time"]
    assert started >= delayed.created_at + 1.0 - 0.01  # the worker's clock is the same host's


def test_an_idempotency_key_answers_the_first_task(scheduler):
    client = scheduler.client
    first = client.call(TaskSubmit(queue="k", task_type="noop", key="once"))
    again = client.call(TaskSubmit(queue="k", task_type="noop", key="once", priority=9))
    assert not first.duplicate and again.duplicate and again.task.id == first.task.id
    elsewhere = client.call(TaskSubmit(queue="k", task_type="noop", key="once", session_id="s2"))
    assert not elsewhere.duplicate and elsewhere.task.id != first.task.id
    assert len(client.call(TaskList(queue="k")).tasks) == 2


def test_schedule_to_start_timeout_fails_a_task_nobody_takes(scheduler):
    task = scheduler.submit("nobody", "noop", timeouts=Timeouts(schedule_to_start=0.3))
    done = scheduler.wait_state(task.id)
    assert done.state is S.FAILED and done.error_type == SCHEDULE_TO_START_TIMEOUT
    assert done.attempts == []


def test_start_to_close_timeout_ends_the_attempt_and_the_handler_sees_it(scheduler):
    scheduler.start_worker("stc")
    task = scheduler.submit("stc", "block", timeouts=Timeouts(start_to_close=0.5), retry=ONCE)
    done = scheduler.wait_state(task.id)
    assert done.state is S.DEAD and done.error_type == START_TO_CLOSE_TIMEOUT
    assert done.attempts[0].error_type == START_TO_CLOSE_TIMEOUT
    scheduler.wait_record("cancelled", task.id)


def test_heartbeat_timeout_ends_an_attempt_whose_worker_went_silent(scheduler):
    scheduler.start_worker("hb")
    task = scheduler.submit("hb", "freeze", {"seconds": 2.5}, timeouts=Timeouts(heartbeat=0.5), retry=ONCE)
    done = scheduler.wait_state(task.id)
    assert done.state is S.DEAD and done.error_type == HEARTBEAT_TIMEOUT
    assert done.finished_at - done.attempts[0].leased_at < 2.5  # before the frozen handler came back


def test_heartbeats_keep_a_task_that_runs_past_its_heartbeat_timeout_leased(scheduler):
    scheduler.start_worker("hb-ok")
    task = scheduler.submit("hb-ok", "sleep", {"seconds": 1.5}, timeouts=Timeouts(heartbeat=0.4), retry=ONCE)
    done = scheduler.wait_state(task.id)
    assert done.state is S.SUCCEEDED and len(done.attempts) == 1


def test_retries_follow_the_backoff(scheduler):
    scheduler.start_worker("r")
    policy = RetryPolicy(initial_interval=0.3, backoff_coefficient=2.0, maximum_attempts=5, jitter="none")
    task = scheduler.submit("r", "flaky", {"fail_times": 2}, retry=policy)
    done = scheduler.wait_state(task.id)
    assert done.state is S.SUCCEEDED and msgspec.msgpack.decode(done.result) == 3
    first, second, third = done.attempts
    assert first.error_type == "ValueError" and second.error_type == "ValueError"
    # Each retry waits at least its interval (0.3 s, then 0.6 s); generous on the late side.
    assert 0.3 - 0.02 <= second.leased_at - first.ended_at <= 0.3 + 1.0
    assert 0.6 - 0.02 <= third.leased_at - second.ended_at <= 0.6 + 1.0


def test_non_retryable_errors_fail_at_once(scheduler):
    scheduler.start_worker("nr")
    fatal = scheduler.submit("nr", "fatal")
    listed = scheduler.submit("nr", "fail", retry=RetryPolicy(non_retryable_errors=["ValueError"]))
    coded = scheduler.submit("nr", "coded")
    for task_id in (fatal.id, listed.id, coded.id):
        done = scheduler.wait_state(task_id)
        assert done.state is S.FAILED and len(done.attempts) == 1
    assert scheduler.get(fatal.id).error_type == "NonRetryableError"
    assert scheduler.get(coded.id).error_type == "NOT_FOUND"


def test_out_of_attempts_is_dead_and_a_requeue_runs_it_again(scheduler):
    scheduler.start_worker("dl")
    policy = RetryPolicy(initial_interval=0.05, maximum_attempts=2)
    task = scheduler.submit("dl", "fail", {"message": "broken"}, retry=policy)
    dead = scheduler.wait_state(task.id)
    assert dead.state is S.DEAD and dead.error == "broken" and len(dead.attempts) == 2
    assert [t.id for t in scheduler.client.call(TaskList(states=[S.DEAD])).tasks] == [task.id]
    requeued = scheduler.client.call(TaskRequeue(id=task.id))
    assert requeued.state is S.QUEUED
    again = scheduler.wait_state(task.id)
    assert again.state is S.DEAD and len(again.attempts) == 4  # a full set of attempts again


def test_cancel_of_a_queued_task_means_it_never_starts(scheduler):
    task = scheduler.submit("c", "noop")
    cancelled = scheduler.client.call(TaskCancel(id=task.id, reason="not needed"))
    assert cancelled.state is S.CANCELLED
    scheduler.start_worker("c")
    later = scheduler.submit("c", "noop")
    scheduler.wait_state(later.id)
    assert scheduler.records(task_id=task.id) == []
    assert (
        error_of(lambda: scheduler.client.call(TaskCancel(id=task.id))).code is ErrorCode.FAILED_PRECONDITION
    )


def test_cancel_of_a_running_task_reaches_its_handler(scheduler):
    scheduler.start_worker("c")
    task = scheduler.submit("c", "block")
    scheduler.wait_record("start", task.id)
    asked = scheduler.client.call(TaskCancel(id=task.id))
    assert asked.cancel_requested
    done = scheduler.wait_state(task.id)
    assert done.state is S.CANCELLED
    scheduler.wait_record("cancelled", task.id)


def test_a_queue_limit_holds_its_tasks_to_one_at_a_time(make_host):
    scheduler = start_scheduler(make_host, {"scheduler": {"queue_max_running": {"lim": 1}}})
    scheduler.start_worker("lim,free", slots=3)
    limited = [scheduler.submit("lim", "sleep", {"seconds": 1.0}).id for _ in range(3)]
    free = [scheduler.submit("free", "sleep", {"seconds": 1.0}).id for _ in range(2)]
    for task_id in limited + free:
        scheduler.wait_state(task_id)
    assert not overlapping(run_intervals(scheduler, limited))
    assert overlapping(run_intervals(scheduler, free + limited[:1]))


def test_a_session_limit_holds_each_session_to_one_at_a_time(make_host):
    scheduler = start_scheduler(make_host, {"scheduler": {"session_max_running": 1}})
    scheduler.start_worker("s", slots=3)
    in_a = [scheduler.submit("s", "sleep", {"seconds": 1.0}, session_id="a").id for _ in range(2)]
    in_b = scheduler.submit("s", "sleep", {"seconds": 1.0}, session_id="b").id
    for task_id in [*in_a, in_b]:
        scheduler.wait_state(task_id)
    assert not overlapping(run_intervals(scheduler, in_a))
    assert overlapping(run_intervals(scheduler, [in_a[0], in_b])) or overlapping(
        run_intervals(scheduler, [in_a[1], in_b])
    )


def test_a_task_on_a_queue_nobody_serves_waits_and_is_listed(scheduler):
    task = scheduler.submit("no-such-queue", "noop")
    listed = scheduler.client.call(TaskList(queue="no-such-queue", states=[S.QUEUED])).tasks
    assert [t.id for t in listed] == [task.id]


def stored(scheduler) -> tuple:
    client = scheduler.client
    return client.call(TaskList()).tasks, client.call(TaskScheduleList()).schedules


@pytest.mark.parametrize(
    "request_, code, says",
    [
        (TaskSubmit(queue="q", task_type="noop", payload=b"\xc1"), ErrorCode.INVALID_ARGUMENT, "not msgpack"),
        (
            TaskSubmit(queue="q", task_type="noop", payload=payload("x" * 300_000)),
            ErrorCode.INVALID_ARGUMENT,
            "more than the",
        ),
        (TaskScheduleAdd(queue="q", task_type="noop", cron="61 * * * *"), ErrorCode.INVALID_ARGUMENT, "cron"),
        (TaskScheduleAdd(queue="q", task_type="noop"), ErrorCode.INVALID_ARGUMENT, "exactly one of"),
        (TaskGet(id="nope"), ErrorCode.NOT_FOUND, "no task nope"),
        (TaskCancel(id="nope"), ErrorCode.NOT_FOUND, "no task nope"),
        (TaskRequeue(id="nope"), ErrorCode.NOT_FOUND, "no task nope"),
        (TaskHeartbeat(task_id="nope", lease_id="x"), ErrorCode.FAILED_PRECONDITION, "not held"),
        (
            TaskComplete(task_id="nope", lease_id="x", outcome="succeeded"),
            ErrorCode.FAILED_PRECONDITION,
            "not held",
        ),
    ],
)
def test_bad_input_is_refused_clearly_and_changes_nothing(scheduler, request_, code, says):
    scheduler.submit("q", "noop")  # something stored, to see it unchanged
    before = stored(scheduler)
    error = error_of(lambda: scheduler.client.call(request_))
    assert error.code is code and says in error.message
    assert stored(scheduler) == before


def test_negative_delays_and_bad_names_are_refused_by_the_schema(scheduler):
    client = scheduler.client
    for body in (
        {"type": "task.submit", "queue": "q", "task_type": "noop", "delay": -1},
        {"type": "task.submit", "queue": "../q", "task_type": "noop"},
        {"type": "task.submit", "queue": "q", "task_type": "noop", "priority": 5000},
    ):
        error = error_of(lambda body=body: client.call_raw("task.submit", msgspec.msgpack.encode(body)))
        assert error.code is ErrorCode.INVALID_ARGUMENT and error.details.get("path")
    assert client.call(TaskList()).tasks == []


def test_closing_a_session_cancels_its_queued_and_running_tasks(make_host):
    from baaaht.schemas.sessions import SessionClose, SessionCreate
    from tests.scheduler_doubles import FAST, SCHEDULER, Scheduler
    from tests.session_doubles import start_sessions_host

    host = start_sessions_host(lambda overrides: make_host({**overrides, **FAST}))
    scheduler = Scheduler(host)
    host.start_service(SCHEDULER, "scheduler", service="task")
    scheduler.start_worker("sess")
    session_id = scheduler.client.call(SessionCreate(owner="alice")).id
    running = scheduler.submit("sess", "block", session_id=session_id)
    scheduler.wait_record("start", running.id)
    queued = scheduler.submit("sess", "noop", session_id=session_id)  # the one slot is busy
    other = scheduler.submit("elsewhere", "noop", session_id="another")
    scheduler.client.call(SessionClose(session_id=session_id))
    assert scheduler.wait_state(queued.id).state is S.CANCELLED
    assert scheduler.wait_state(running.id).state is S.CANCELLED
    scheduler.wait_record("cancelled", running.id)
    assert scheduler.records(task_id=queued.id) == []
    assert scheduler.get(other.id).state is S.QUEUED


def start_times(scheduler, task_ids) -> list[float]:
    """When the scheduler started each task (its lease, what a rate limits), not when the worker saw
    it: a loaded machine delays some leases' receipt more than others'."""
    return sorted(scheduler.get(task_id).attempts[0].started_at for task_id in task_ids)


def test_a_queue_rate_spaces_the_starts_after_its_burst(make_host):
    scheduler = start_scheduler(make_host, {"scheduler": {"queue_rate": {"slow": 4.0}}})
    scheduler.start_worker("slow,fast", slots=4)
    slow = [scheduler.submit("slow", "noop").id for _ in range(12)]
    fast = [scheduler.submit("fast", "noop").id for _ in range(12)]
    for task_id in slow + fast:
        scheduler.wait_state(task_id)
    starts = start_times(scheduler, slow)
    # A burst of one second's worth (4), then one start every 1/4 s: the 12th at least 2 s after the first.
    for n in range(4, 12):
        assert starts[n] - starts[0] >= (n - 3) * 0.25 - 0.05, (n, starts)
    fast_starts = start_times(scheduler, fast)
    assert fast_starts[-1] < starts[-1]  # the other queue is not held behind the slow one


def test_a_session_rate_holds_each_session_apart(make_host):
    scheduler = start_scheduler(make_host, {"scheduler": {"session_rate": 2.0}})
    scheduler.start_worker("s", slots=4)
    in_a = [scheduler.submit("s", "noop", session_id="a").id for _ in range(6)]
    in_b = [scheduler.submit("s", "noop", session_id="b").id for _ in range(6)]
    for task_id in in_a + in_b:
        scheduler.wait_state(task_id)
    for session_tasks in (in_a, in_b):
        starts = start_times(scheduler, session_tasks)
        for n in range(2, 6):  # a burst of 2, then one every 1/2 s, in each session alone
            assert starts[n] - starts[0] >= (n - 1) * 0.5 - 0.05, (n, starts)
    assert start_times(scheduler, in_b)[0] < start_times(scheduler, in_a)[-1]  # b did not wait for a


def test_finished_tasks_are_pruned_after_the_retention_and_nothing_else(make_host):
    scheduler = start_scheduler(make_host, {"scheduler": {"task_retention": "1s", "prune_interval": "100ms"}})
    scheduler.start_worker("p")
    done = scheduler.wait_state(scheduler.submit("p", "noop").id)
    waiting = scheduler.submit("nobody", "noop")
    wait_for(
        lambda: error_of(lambda: scheduler.get(done.id)).code is ErrorCode.NOT_FOUND,
        15,
        what="the finished task to be pruned",
    )
    assert time.time() >= done.finished_at + 1.0
    assert [t.id for t in scheduler.client.call(TaskList()).tasks] == [waiting.id]
