"""The scheduler's pure parts: retry verdicts, schedule times, limits, caller scope, the Core's dispatch."""

from __future__ import annotations

import asyncio
import os

import msgspec
import pytest

from baaaht.bus.background import Stopping
from baaaht.bus.errors import BusError
from baaaht.schemas.bus import Caller
from baaaht.schemas.config import SchedulerConfig
from baaaht.schemas.errors import ErrorCode
from baaaht.schemas.sessions import SessionInfo, SessionState
from baaaht.schemas.tasks import (
    LEASE_BATCH_BYTES,
    RetryPolicy,
    ScheduleInfo,
    TaskAssignment,
    TaskComplete,
    TaskInfo,
    TaskScheduleAdd,
    TaskState,
    TaskSubmit,
    TaskWork,
    Timeouts,
)
from baaaht.services.scheduler import retry, schedules
from baaaht.services.scheduler.core import Core, Now, lease_batches
from baaaht.services.scheduler.ids import BATCH, ID_BYTES, RandomIds
from baaaht.services.scheduler.limits import Limit, TokenBucket
from baaaht.services.scheduler.scope import check_submit_queue, scope_of, session_for
from baaaht.services.scheduler.sessions import catch_up, session_peer


def test_backoff_grows_by_the_coefficient_up_to_the_cap():
    policy = RetryPolicy(initial_interval=1.0, backoff_coefficient=2.0, maximum_interval=5.0)
    assert [retry.interval(policy, n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_full_jitter_draws_from_zero_to_the_interval():
    policy = RetryPolicy(initial_interval=4.0)
    bounds = []
    verdict = retry.after_failure(policy, 1, "E", uniform=lambda a, b: bounds.append((a, b)) or b / 2)
    assert verdict.action == "retry" and verdict.delay == 2.0 and bounds == [(0.0, 4.0)]
    assert retry.after_failure(RetryPolicy(initial_interval=4.0, jitter="none"), 1, "E").delay == 4.0


def test_verdicts_non_retryable_and_out_of_attempts():
    policy = RetryPolicy(maximum_attempts=3, non_retryable_errors=["Fatal"])
    assert retry.after_failure(policy, 1, "Fatal").action == "fail"
    assert retry.after_failure(policy, 1, "Other", non_retryable=True).action == "fail"
    assert retry.after_failure(policy, 2, "Other").action == "retry"
    assert retry.after_failure(policy, 3, "Other").action == "dead"


def schedule(**fields) -> ScheduleInfo:
    return ScheduleInfo(**{"id": "s", "queue": "q", "task_type": "t", "created_at": 1000.0, **fields})


def test_interval_runs_are_anchored_at_creation():
    every = schedule(every=10.0)
    assert schedules.next_after(every, 1000.0) == 1010.0
    assert schedules.next_after(every, 1015.0) == 1020.0
    assert schedules.latest_at_or_before(every, 1010.0, 1_000_000.5) == 1_000_000.0


def test_cron_runs_in_utc():
    hourly = schedule(cron="0 * * * *")
    assert schedules.next_after(hourly, 3600 * 5 + 1) == 3600 * 6


def test_a_schedule_needs_one_valid_spec():
    for cron, every in (("", 0.0), ("* * * * *", 5.0), ("61 * * * *", 0.0), ("", 0.001)):
        with pytest.raises(BusError) as caught:
            schedules.check(cron, every)
        assert caught.value.code is ErrorCode.INVALID_ARGUMENT
    schedules.check("*/5 * * * *", 0.0)


def test_missed_runs_make_one_run_within_the_catch_up_window():
    every = schedule(every=10.0, catch_up_window=25.0, next_run_at=1010.0)
    # down from 1005 to 1031: runs at 1010, 1020 and 1030 missed; the latest is 1 s ago: one run.
    fire = schedules.fire(every, 1031.0, up_since=1031.0)
    assert fire.run and fire.run_time == 1030.0 and fire.next_run_at == 1040.0
    # up again only at 1059: the latest missed run (1050) is within 25 s too, and still just one.
    assert schedules.fire(every, 1059.0, up_since=1059.0).run_time == 1050.0
    narrow = schedule(every=10.0, catch_up_window=0.5, next_run_at=1010.0)
    assert not schedules.fire(narrow, 1031.0, up_since=1031.0).run
    # a timer that fires late while the scheduler is up always runs
    assert schedules.fire(narrow, 1011.0, up_since=1000.0).run


def test_token_bucket_and_concurrency_limit():
    bucket = TokenBucket(rate=2.0)
    assert bucket.available(0.0)
    bucket.take(0.0)
    bucket.take(0.0)
    assert not bucket.available(0.0) and bucket.next_token_at(0.0) == pytest.approx(0.5)
    assert bucket.available(0.5)
    limit = Limit(max_running=1)
    assert limit.allows(0.0)
    limit.started(0.0)
    assert not limit.allows(0.0)
    limit.ended()
    assert limit.allows(0.0)


def test_scope_comes_from_the_stamp_only():
    assert scope_of(Caller(socket="services", role="operator"), "submit") is None
    assistant = Caller(socket="agents", role="assistant", session="s1")
    assert scope_of(assistant, "submit") == "s1" and session_for(assistant, "", "submit") == "s1"
    worker = Caller(socket="agents", role="worker", session="s1")
    assert scope_of(worker, "work") == "s1"
    for caller, action in (
        (assistant, "work"),
        (worker, "submit"),
        (Caller(socket="agents", role="agent", session="s1"), "read"),
        (Caller(socket="agents"), "read"),
        (Caller(socket="services"), "read"),  # no stamped role: unidentified, whatever its socket
        (Caller(socket="agents", role="worker"), "work"),
    ):
        with pytest.raises(BusError) as caught:
            scope_of(caller, action)
        assert caught.value.code is ErrorCode.PERMISSION_DENIED
    with pytest.raises(BusError) as caught:
        session_for(assistant, "s2", "submit")
    assert caught.value.code is ErrorCode.PERMISSION_DENIED


def test_an_assistant_submits_only_tool_calls_and_the_host_into_any_queue():
    check_submit_queue(Caller(socket="services", role="operator"), "images")
    check_submit_queue(Caller(socket="services", role="service", service="container"), "images")
    assistant = Caller(socket="agents", role="assistant", session="s1")
    check_submit_queue(assistant, "tools")
    with pytest.raises(BusError) as caught:
        check_submit_queue(assistant, "images")
    assert caught.value.code is ErrorCode.PERMISSION_DENIED
    assert "'images'" in caught.value.message and "tools" in caught.value.message


class Clock:
    def __init__(self):
        self.wall, self.mono = 1_000_000.0, 50.0

    def now(self) -> Now:
        return Now(self.wall, self.mono)

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


def core_with_worker(clock, session_scope=None, slots=1, **config):
    ids = (f"id{n}" for n in range(1000))
    core = Core(SchedulerConfig(**config), lambda _id: None, new_id=lambda: next(ids))
    core.load([], [], [], clock.now())
    pushed = []
    core.work_open(
        TaskWork(worker_id="w", queues=["q"], slots=slots),
        session_scope,
        pushed.append,
        object(),
        clock.now(),
    )
    return core, pushed


def dispatched(core: Core, now: Now) -> None:
    """Dispatch, and deliver what the engine would push after its commit."""
    core.dispatch(now)
    effects = core.take_effects()
    for push, assignment in [*effects.leases, *effects.pushes]:
        push(assignment)


def test_dispatch_is_by_priority_then_age_and_a_completion_is_recorded_once():
    clock = Clock()
    core, pushed = core_with_worker(clock)
    low, _ = core.submit(TaskSubmit(queue="q", task_type="t"), "", clock.now())
    clock.advance(0.1)
    high, _ = core.submit(TaskSubmit(queue="q", task_type="t", priority=3), "", clock.now())
    dispatched(core, clock.now())
    assert [a.task_id for a in pushed] == [high.id]
    lease = pushed[0].lease_id
    core.ack(high.id, lease, None, clock.now())
    core.complete(TaskComplete(task_id=high.id, lease_id=lease, outcome="succeeded"), None, clock.now())
    with pytest.raises(BusError) as caught:
        core.complete(TaskComplete(task_id=high.id, lease_id=lease, outcome="succeeded"), None, clock.now())
    assert caught.value.code is ErrorCode.FAILED_PRECONDITION
    dispatched(core, clock.now())
    assert [a.task_id for a in pushed] == [high.id, low.id]


def test_a_task_finished_in_this_turn_is_answered_finished_before_its_commit():
    """A fast task completes and its wait opens in the same engine turn: the store still holds it running
    (the turn is not committed), and the wait must not take that row for the finished task."""
    clock = Clock()
    ids = (f"id{n}" for n in range(1000))
    committed: dict[str, TaskInfo] = {}
    core = Core(SchedulerConfig(), committed.get, new_id=lambda: next(ids))
    core.load([], [], [], clock.now())
    pushed = []
    core.work_open(TaskWork(worker_id="w", queues=["q"], slots=1), None, pushed.append, object(), clock.now())
    task, _ = core.submit(TaskSubmit(queue="q", task_type="t"), "", clock.now())
    dispatched(core, clock.now())
    committed[task.id] = msgspec.structs.replace(core.tasks[task.id])  # the store: running
    core.complete(
        TaskComplete(task_id=task.id, lease_id=pushed[0].lease_id, outcome="succeeded"), None, clock.now()
    )
    answer = core.wait_open(task.id, None, pushed.append)
    assert answer is not None and answer.state is TaskState.SUCCEEDED
    with pytest.raises(BusError) as caught:
        core.task(task.id, None)
    assert "succeeded" in caught.value.message


def test_outcomes_completed_together_are_each_recorded_or_refused_on_their_own():
    clock = Clock()
    core, pushed = core_with_worker(clock, slots=3)
    tasks = [core.submit(TaskSubmit(queue="q", task_type="t"), "", clock.now())[0] for _ in range(3)]
    dispatched(core, clock.now())
    lease = {a.task_id: a.lease_id for a in pushed}
    first, second, third = (lease[t.id] for t in tasks)
    core.complete(TaskComplete(task_id=tasks[2].id, lease_id=third, outcome="succeeded"), None, clock.now())
    core.take_effects()

    def outcome(n, lease_id, **fields):
        return TaskComplete(task_id=tasks[n].id, lease_id=lease_id, **fields)

    nested = outcome(0, first, outcome="succeeded", more=[outcome(1, second, outcome="failed")])
    with pytest.raises(BusError) as caught:  # refused whole: nothing recorded
        core.complete_batch(outcome(2, third, outcome="succeeded", more=[nested]), None, clock.now())
    assert caught.value.code is ErrorCode.INVALID_ARGUMENT
    assert core.take_effects().tasks == {}

    batch = outcome(
        0,
        first,
        outcome="succeeded",
        result=b"\xc0",
        more=[
            outcome(1, second, outcome="failed", error_type="Boom", non_retryable=True),
            outcome(2, third, outcome="succeeded"),  # already recorded
        ],
    )
    answer = core.complete_batch(batch, None, clock.now())
    assert [(r.lease_id, r.code) for r in answer.refused] == [(third, ErrorCode.FAILED_PRECONDITION)]
    written = core.take_effects().tasks
    assert set(written) == {tasks[0].id, tasks[1].id}
    assert written[tasks[0].id].state is TaskState.SUCCEEDED and written[tasks[0].id].result == b"\xc0"
    assert written[tasks[1].id].state is TaskState.FAILED and written[tasks[1].id].error_type == "Boom"


def test_a_lease_starts_its_task_and_goes_out_before_the_commit_where_the_rest_waits():
    clock = Clock()
    core, pushed = core_with_worker(clock)
    task, _ = core.submit(TaskSubmit(queue="q", task_type="t"), "", clock.now())
    core.dispatch(clock.now())
    effects = core.take_effects()
    assert [(a.kind, a.task_id) for _push, a in effects.leases] == [("lease", task.id)]
    assert effects.pushes == []  # nothing else is handed out before the commit
    assert effects.tasks[task.id].state is TaskState.RUNNING  # no acknowledgement is waited for
    assert effects.tasks[task.id].attempts[0].started_at == clock.wall
    assert [type(e).__name__ for e in effects.events] == ["TaskQueued", "TaskStarted"]


def test_a_session_worker_gets_only_its_sessions_tasks():
    clock = Clock()
    core, pushed = core_with_worker(clock, session_scope="mine", slots=4)
    other, _ = core.submit(TaskSubmit(queue="q", task_type="t", priority=9), "theirs", clock.now())
    mine, _ = core.submit(TaskSubmit(queue="q", task_type="t"), "mine", clock.now())
    dispatched(core, clock.now())
    assert [a.task_id for a in pushed] == [mine.id]
    assert core.tasks[other.id].state is TaskState.QUEUED


def test_an_expired_lease_is_retried_after_its_backoff():
    clock = Clock()
    core, pushed = core_with_worker(clock, lease_timeout=2.0)
    policy = RetryPolicy(initial_interval=1.0, jitter="none")
    task, _ = core.submit(TaskSubmit(queue="q", task_type="t", retry=policy), "", clock.now())
    dispatched(core, clock.now())
    clock.advance(2.0)
    core.fire_timers(clock.now())
    assert core.tasks[task.id].state is TaskState.QUEUED
    assert core.tasks[task.id].attempts[0].error_type == "HeartbeatTimeout"
    assert core.next_timer() == pytest.approx(clock.mono + 1.0)
    clock.advance(1.0)
    core.fire_timers(clock.now())
    dispatched(core, clock.now())
    assert [a.attempt for a in pushed if a.kind == "lease"] == [1, 2]


def test_a_queue_rate_lets_starts_through_as_its_tokens_come():
    clock = Clock()
    core, pushed = core_with_worker(clock, slots=10, queue_rate={"q": 2.0})
    for _ in range(5):
        core.submit(TaskSubmit(queue="q", task_type="t"), "", clock.now())
    dispatched(core, clock.now())
    assert len(pushed) == 2  # a second's worth
    assert core.next_timer() == pytest.approx(clock.mono + 0.5)  # woken when the next token is there
    clock.advance(0.5)
    core.fire_timers(clock.now())
    dispatched(core, clock.now())
    assert len(pushed) == 3


def test_a_timer_the_clocks_put_early_is_armed_again():
    clock = Clock()
    core, pushed = core_with_worker(clock)
    delayed, _ = core.submit(TaskSubmit(queue="q", task_type="t", delay=10.0), "", clock.now())
    schedule = core.add_schedule(TaskScheduleAdd(queue="q", task_type="t", every=10.0), "", clock.now())
    clock.mono += 10.0  # the wall clock was set back a second meanwhile: the timers come early
    clock.wall += 9.0
    core.fire_timers(clock.now())
    dispatched(core, clock.now())
    assert core.schedules[schedule.id].runs == 0 and pushed == []
    clock.advance(1.0)
    core.fire_timers(clock.now())
    dispatched(core, clock.now())
    assert core.schedules[schedule.id].runs == 1
    assert delayed.id in [a.task_id for a in pushed]


class SessionsAnswering:
    """A bus on which the session service answers from `states` (missing: NOT_FOUND), after
    `unavailable` calls that found no session service (the broker's own NOT_FOUND, naming no session)."""

    def __init__(self, states: dict[str, SessionState], unavailable: int = 0):
        self.states, self.unavailable = states, unavailable

    def call(self, request, timeout=None, correlation_id=""):
        if self.unavailable:
            self.unavailable -= 1
            raise BusError(ErrorCode.NOT_FOUND, "no service 'session' is registered")
        if request.session_id not in self.states:
            raise BusError(ErrorCode.NOT_FOUND, "no session", {"session_id": request.session_id})
        return SessionInfo(
            id=request.session_id,
            state=self.states[request.session_id],
            owner="o",
            created_at=1.0,
            updated_at=1.0,
            last_activity_at=1.0,
        )


def test_sessions_that_ended_are_those_closed_or_gone_once_the_session_service_answers():
    bus = SessionsAnswering({"open": SessionState.ACTIVE, "shut": SessionState.CLOSED}, unavailable=2)
    stopping = Stopping()
    pauses = []
    stopping.wait = lambda seconds: pauses.append(seconds) or False
    ended = []
    catch_up(session_peer(bus, 1.0), {"open", "shut", "gone"}, ended.append, stopping)
    assert ended == ["gone", "shut"]
    assert pauses == [1.0, 2.0]  # the broker's NOT_FOUND was no answer about a session: asked again


def test_ids_are_random_hex_drawn_from_the_os_a_batch_at_a_time():
    draws = []

    def urandom(size: int) -> bytes:
        draws.append(size)
        return os.urandom(size)

    ids = RandomIds(urandom)
    made = [ids() for _ in range(BATCH + 1)]
    assert draws == [ID_BYTES * BATCH] * 2  # one draw per BATCH ids, not one each
    assert len(set(made)) == len(made) and all(len(i) == 2 * ID_BYTES for i in made)
    assert all(int(i, 16) >= 0 for i in made)
    default = Core(SchedulerConfig(), lambda _id: None).new_id
    assert isinstance(default, RandomIds)


def test_a_batch_submit_is_accepted_whole_in_order_or_refused_whole_naming_the_bad_task():
    clock = Clock()
    core, _pushed = core_with_worker(clock, slots=0)
    good = TaskSubmit(queue="q", task_type="t", payload=b"\x01")
    bad = TaskSubmit(queue="q", task_type="t", payload=b"\xc1")  # not msgpack
    with pytest.raises(BusError) as caught:
        core.submit_batch([good, good, bad], ["", "", ""], clock.now())
    assert caught.value.code is ErrorCode.INVALID_ARGUMENT
    assert caught.value.message.startswith("more[1]: payload") and caught.value.details["item"] == 1
    effects = core.take_effects()
    assert core.tasks == {} and effects.tasks == {} and effects.events == []

    keyed = TaskSubmit(queue="q", task_type="t", key="k")
    accepted = core.submit_batch(
        [good, keyed, TaskSubmit(queue="q", task_type="u"), keyed], ["", "s", "", "s"], clock.now()
    )
    assert [(task.task_type, task.session_id, duplicate) for task, duplicate in accepted] == [
        ("t", "", False),
        ("t", "s", False),
        ("u", "", False),
        ("t", "s", True),  # the same key in the same call: the first task with it
    ]
    assert accepted[3][0].id == accepted[1][0].id
    assert set(core.take_effects().tasks) == {task.id for task, _ in accepted}


def test_a_session_holds_at_most_its_cap_of_unfinished_tasks_and_a_finished_one_makes_room():
    clock = Clock()
    core, _pushed = core_with_worker(clock, slots=0, session_max_unfinished=2)
    submit = TaskSubmit(queue="q", task_type="t")
    first, _ = core.submit(submit, "s", clock.now())
    core.submit(TaskSubmit(queue="q", task_type="t", key="k"), "s", clock.now())
    with pytest.raises(BusError) as caught:
        core.submit(submit, "s", clock.now())
    assert caught.value.code is ErrorCode.RESOURCE_EXHAUSTED
    assert caught.value.details == {"session_id": "s", "limit": 2}
    assert "session_max_unfinished" in caught.value.message
    # a submit its key answers adds nothing: it is answered; another session and the host are not held
    assert core.submit(TaskSubmit(queue="q", task_type="t", key="k"), "s", clock.now())[1] is True
    core.submit(submit, "other", clock.now())
    core.submit_batch([submit] * 5, [""] * 5, clock.now())
    with pytest.raises(BusError) as caught:  # a batch is refused whole, before anything changes
        core.submit_batch([submit, submit], ["other", "other"], clock.now())
    assert caught.value.code is ErrorCode.RESOURCE_EXHAUSTED and core.unfinished["other"] == 1
    core.cancel(first.id, None, "not needed", clock.now())
    assert core.submit(submit, "s", clock.now())[0].session_id == "s"


def test_a_submits_charge_counts_only_the_tasks_it_creates_once_nothing_else_refuses_them():
    """The service's per-session task quota is charged here: a submit refused for its payload or the
    session's room, or a retry its key answers, spent the session's attempts though no task was made."""
    clock = Clock()
    core, _pushed = core_with_worker(clock, slots=0, session_max_unfinished=3)
    charged: list[int] = []
    three = TaskSubmit(queue="q", task_type="t", key="k", retry=RetryPolicy(maximum_attempts=3))
    core.submit(three, "s", clock.now(), charged.append)
    assert core.submit(three, "s", clock.now(), charged.append)[1] is True  # a client's retry
    with pytest.raises(BusError):
        core.submit(TaskSubmit(queue="q", task_type="t", payload=b"\xc1"), "s", clock.now(), charged.append)
    two = TaskSubmit(queue="q", task_type="t", retry=RetryPolicy(maximum_attempts=2))
    core.submit_batch([two, three, two], ["s", "s", "s"], clock.now(), charged.append)  # the key's is known
    with pytest.raises(BusError) as caught:  # past session_max_unfinished
        core.submit_batch([two], ["s"], clock.now(), charged.append)
    assert "session_max_unfinished" in caught.value.message
    with pytest.raises(BusError):
        core.submit(two, "s", clock.now(), charged.append)
    assert charged == [3, 4]

    def refuse(attempts: int) -> None:
        raise BusError(ErrorCode.RESOURCE_EXHAUSTED, "no more")

    core.take_effects()
    with pytest.raises(BusError) as caught:  # the charge refuses too, before anything changes
        core.submit(two, "other", clock.now(), refuse)
    assert caught.value.message == "no more" and core.unfinished["other"] == 0
    with pytest.raises(BusError):
        core.submit_batch([two, two], ["other", "other"], clock.now(), refuse)
    assert core.unfinished["other"] == 0 and core.take_effects().tasks == {}


def test_an_outcome_ending_while_another_waits_for_its_answer_goes_out_without_waiting_for_it():
    from baaaht.bus.worker import OutcomeSender
    from baaaht.schemas.tasks import TaskCompleteResult

    async def scenario():
        calls, answer = [], asyncio.Event()

        async def report(request, until):
            calls.append([o.lease_id for o in (request, *request.more)])
            await answer.wait()  # the scheduler answers after its commit
            return TaskCompleteResult()

        sender = OutcomeSender(report)

        def outcome(n):
            return TaskComplete(task_id=f"t{n}", lease_id=f"l{n}", outcome="succeeded")

        first = asyncio.create_task(sender.send(outcome(0), 1e9))
        await asyncio.sleep(0)
        together = [asyncio.create_task(sender.send(outcome(n), 1e9)) for n in (1, 2)]
        for _ in range(5):
            await asyncio.sleep(0)
        assert calls == [["l0"], ["l1", "l2"]]  # the two that ended together share one call, at once
        answer.set()
        await asyncio.wait_for(asyncio.gather(first, *together), 5)
        assert sender.in_flight == 0 and sender.flushing is None and not sender.calls

    asyncio.run(scenario())


def test_the_leases_of_one_turn_go_to_each_worker_in_one_partial_of_bounded_size():
    def lease(n: int, size: int = 0) -> TaskAssignment:
        return TaskAssignment(kind="lease", task_id=f"t{n}", lease_id=f"l{n}", payload=b"x" * size)

    a, b = [], []
    leases = [(a.append, lease(0)), (b.append, lease(1)), (a.append, lease(2)), (a.append, lease(3))]
    for push, partial in lease_batches(leases):
        push(partial)
    assert [(p.task_id, [m.task_id for m in p.more]) for p in a] == [("t0", ["t2", "t3"])]
    assert [(p.task_id, p.more) for p in b] == [("t1", [])]

    big = LEASE_BATCH_BYTES // 2 + 1
    sized = [(a.append, lease(4, big)), (a.append, lease(5, big)), (a.append, lease(6, 10))]
    assert [(p.task_id, [m.task_id for m in p.more]) for _push, p in lease_batches(sized)] == [
        ("t4", []),
        ("t5", ["t6"]),
    ]
    # each worker's batch counts its own payloads: b's lease between a's fills none of a's
    mixed = [(a.append, lease(7, big)), (b.append, lease(8, big)), (a.append, lease(9, 10))]
    assert [(p.task_id, [m.task_id for m in p.more]) for _push, p in lease_batches(mixed)] == [
        ("t7", ["t9"]),
        ("t8", []),
    ]


def test_the_leases_a_dispatch_gives_a_worker_come_out_as_one_partial():
    clock = Clock()
    core, pushed = core_with_worker(clock, slots=3)
    tasks = [core.submit(TaskSubmit(queue="q", task_type="t"), "", clock.now())[0] for _ in range(3)]
    core.dispatch(clock.now())
    for push, partial in lease_batches(core.take_effects().leases):
        push(partial)
    assert [(p.task_id, [m.task_id for m in p.more]) for p in pushed] == [
        (tasks[0].id, [tasks[1].id, tasks[2].id])
    ]


def test_a_queued_tasks_schedule_to_start_deadline_holds_across_a_restart():
    """The deadline's timer was armed only at the submit: a task queued when the scheduler restarted (or
    rebuilt its Core after a failed commit) and never taken stayed queued forever."""
    clock = Clock()
    core = Core(SchedulerConfig(), lambda _id: None)
    core.load([], [], [], clock.now())
    req = TaskSubmit(queue="q", task_type="t", timeouts=Timeouts(schedule_to_start=10.0))
    task, _ = core.submit(req, "", clock.now())
    clock.advance(4.0)
    restarted = Core(SchedulerConfig(), lambda _id: None)
    restarted.load([(msgspec.structs.replace(task), "", "")], [], [], clock.now())
    clock.advance(5.0)
    restarted.fire_timers(clock.now())
    assert restarted.tasks[task.id].state is TaskState.QUEUED  # 9 s of its 10
    clock.advance(1.5)
    restarted.fire_timers(clock.now())
    failed = restarted.take_effects().tasks[task.id]
    assert failed.state is TaskState.FAILED and failed.error_type == "ScheduleToStartTimeout"
