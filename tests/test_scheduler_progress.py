"""Streamed task output end to end: a real broker, the scheduler process, a test worker process
(tests/services/task_worker.py) or worker agents on the agent socket; waiters on `task.wait`."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time

import msgspec
import pytest

from baaaht.bus.aio import AsyncBusClient
from baaaht.bus.testing import error_of, next_event, run_async, wait_for
from baaaht.bus.worker import Worker
from baaaht.schemas.bus import BusEventsReplay, BusPing
from baaaht.schemas.errors import ErrorCode
from baaaht.schemas.tasks import (
    TaskAssignment,
    TaskCancel,
    TaskComplete,
    TaskFinished,
    TaskList,
    TaskProgress,
    TaskProgressed,
    TaskProgressReport,
    TaskState,
    TaskSubmit,
    TaskWait,
    TaskWork,
)
from tests.scheduler_doubles import leases_of, payload, start_scheduler


@pytest.fixture
def scheduler(make_host):
    return start_scheduler(make_host)


def test_progress_reaches_a_waiter_and_the_events_in_order_then_the_finished_task(scheduler, tmp_path):
    scheduler.start_worker("talk")
    gate = tmp_path / "gate"
    with scheduler.client.subscribe(["task.progress"], since=None) as events:
        task = scheduler.submit("talk", "chatter", {"gate": str(gate), "after": 300}, session_id="s1")
        partials, final = [], None
        for item in scheduler.client.stream(TaskWait(id=task.id), timeout=30.0):
            if isinstance(item, TaskFinished):
                final = item
                continue
            assert isinstance(item, TaskProgressReport) and item.task_id == task.id
            partials.append(item)
            if len(partials) == 3:
                gate.touch()  # the waiter got output: let the handler finish
        assert final is not None and final.state is TaskState.SUCCEEDED
        sent = msgspec.msgpack.decode(final.result)
        seqs = [p.seq for p in partials]
        assert seqs == list(range(seqs[0], sent + 1))  # from the call on: none lost, none twice, in order
        assert all(p.data == str(p.seq).encode() and p.attempt == 1 for p in partials)
        published = []
        while len(published) < sent:
            delivery = next_event(events, timeout=10.0, what=f"progress event {len(published) + 1} of {sent}")
            assert delivery.topic == "task.progress/s1"
            published.append(delivery.event)
    assert all(isinstance(e, TaskProgressed) and e.task_id == task.id for e in published)
    assert [e.seq for e in published] == list(range(1, sent + 1))
    assert [e.data for e in published] == [str(n).encode() for n in range(1, sent + 1)]


def test_a_wait_on_a_finished_task_is_answered_at_once(scheduler):
    scheduler.start_worker("q")
    task = scheduler.submit("q", "echo", {"x": 1})
    scheduler.wait_state(task.id)
    items = list(scheduler.client.stream(TaskWait(id=task.id), timeout=5.0))
    assert len(items) == 1 and isinstance(items[0], TaskFinished)
    assert items[0].state is TaskState.SUCCEEDED and msgspec.msgpack.decode(items[0].result) == {"x": 1}
    missing = error_of(lambda: list(scheduler.client.stream(TaskWait(id="nope"), timeout=5.0)))
    assert missing.code is ErrorCode.NOT_FOUND


def test_a_wait_ends_at_the_calls_deadline_and_the_task_goes_on(scheduler):
    scheduler.start_worker("q")
    task = scheduler.submit("q", "block")
    scheduler.wait_record("start", task.id)
    began = time.monotonic()
    timed_out = error_of(lambda: list(scheduler.client.stream(TaskWait(id=task.id), timeout=1.0)))
    assert timed_out.code is ErrorCode.TIMEOUT and time.monotonic() - began < 5.0
    waiting = scheduler.client.stream(TaskWait(id=task.id), timeout=15.0)
    scheduler.client.call(TaskCancel(id=task.id))
    (final,) = list(waiting)
    assert isinstance(final, TaskFinished) and final.state is TaskState.CANCELLED


def test_a_worker_of_one_session_cannot_report_progress_on_anothers_task(scheduler):
    host, operator = scheduler.host, scheduler.client
    host.identify("sess-b", role="worker")
    worker_b = host.agent_client(timeout=10.0)
    worker_b.call(BusPing())  # connected (and identified) before this process becomes session A's
    host.identify("sess-a", role="worker")
    worker_a = host.agent_client(timeout=10.0)
    task = scheduler.submit("tools", "exec", session_id="sess-b")
    work = worker_b.stream(TaskWork(worker_id="b", queues=["tools"]), timeout=30.0)
    lease: TaskAssignment = next(work)
    assert lease.kind == "lease" and lease.task_id == task.id
    with operator.subscribe(["task.progress"], since=None) as events:
        forged = TaskProgress(task_id=task.id, lease_id=lease.lease_id, seq=1, chunks=[b"forged"])
        refused = error_of(lambda: worker_a.call(forged))
        assert refused.code is ErrorCode.FAILED_PRECONDITION
        worker_b.call(TaskProgress(task_id=task.id, lease_id=lease.lease_id, seq=1, chunks=[b"real"]))
        first = next_event(events, timeout=10.0, what="the real progress event").event
    assert first.data == b"real" and first.seq == 1
    not_yours = error_of(lambda: list(worker_a.stream(TaskWait(id=task.id), timeout=5.0)))
    assert not_yours.code is ErrorCode.PERMISSION_DENIED  # a worker may not wait on tasks at all
    work.close()


def test_a_workers_progress_does_not_evict_the_hosts_event_history(scheduler):
    """The scheduler publishes a worker's output: kept as the host's, 5 calls of 64 x 200 KiB evicted the
    host's whole history (64 MiB: every session's and service's events)."""
    host, operator = scheduler.host, scheduler.client
    scheduler.submit("q", "other", session_id="sess-other")  # a host event of another session
    host.identify("sess-a", role="worker")
    worker = host.agent_client(timeout=30.0)
    task = scheduler.submit("tools", "exec", session_id="sess-a")
    work = worker.stream(TaskWork(worker_id="w", queues=["tools"]), timeout=60.0)
    lease = next(leases_of(work))
    assert lease.task_id == task.id
    chunk, calls = b"x" * (200 * 1024), 6  # 6 x 12.8 MiB: past the host's 64 MiB history
    before = operator.call(BusEventsReplay(limit=0)).last_seq
    for call in range(calls):
        chunks = [chunk] * 64
        worker.call(TaskProgress(task_id=task.id, lease_id=lease.lease_id, seq=1 + 64 * call, chunks=chunks))
    wait_for(
        lambda: operator.call(BusEventsReplay(limit=0)).last_seq >= before + calls * 64,
        timeout=30.0,
        what="the progress events published",
    )
    work.close()
    kept = operator.call(BusEventsReplay(since=0, topics=["task.queued/sess-other"], limit=10)).events
    assert [e.topic for e in kept] == ["task.queued/sess-other"]


async def work_until_finished(worker: Worker, scheduler, task_ids: list[str]) -> None:
    """Run `worker` until every task of `task_ids` has finished, then stop it."""
    working = asyncio.create_task(worker.run())
    try:
        for task_id in task_ids:
            await asyncio.to_thread(scheduler.wait_state, task_id)
    finally:
        working.cancel()
        await asyncio.gather(working, return_exceptions=True)


def test_a_worker_agent_with_four_slots_gets_every_report_through_within_its_share(make_host):
    """One agent connection runs at most limits.agent_running_per_caller (2) calls at a time at the
    scheduler: its heartbeats, progress and outcomes of 4 tasks at once must queue, not be refused or
    starved past the 1 s lease."""
    scheduler = start_scheduler(make_host, {"limits": {"agent_running_per_caller": 2}})
    host = scheduler.host
    host.identify("sess-w", role="worker")
    chunks, running, most = 30, set(), []

    async def busy(task):
        running.add(task.id)
        most.append(len(running))
        for n in range(chunks):
            task.progress(str(n).encode())
            await asyncio.sleep(0.05)  # 1.5 s in all: several heartbeats of a 1 s lease
        running.discard(task.id)

    task_ids = [scheduler.submit("tools", "busy", session_id="sess-w").id for _ in range(8)]

    async def work_them() -> None:
        bus = AsyncBusClient(host.endpoints.agents, timeout=10.0)
        async with bus:
            worker = Worker(bus, ["tools"], 4, {"busy": busy}, worker_id="four-slots")
            await work_until_finished(worker, scheduler, task_ids)

    with scheduler.client.subscribe(["task.progress"], since=None) as events:
        run_async(work_them(), 90, "8 tasks on a worker agent with 4 slots")
        counted = collections.Counter()
        while sum(counted.values()) < chunks * len(task_ids):
            counted[next_event(events, timeout=10.0, what="progress events").event.task_id] += 1
    assert max(most) == 4  # four at once on one connection
    for task_id in task_ids:
        done = scheduler.get(task_id)
        assert done.state is TaskState.SUCCEEDED and len(done.attempts) == 1, done.attempts  # no lease lost
        assert counted[task_id] == chunks


def test_an_assistant_waits_on_and_cancels_its_own_sessions_tasks_only(scheduler):
    host = scheduler.host
    host.identify("sess-mine", role="assistant")
    assistant = host.agent_client(timeout=10.0)
    mine = scheduler.submit("nobody", "noop", session_id="sess-mine")
    theirs = scheduler.submit("nobody", "noop", session_id="sess-theirs")
    not_seen = error_of(lambda: list(assistant.stream(TaskWait(id=theirs.id), timeout=5.0)))
    not_cancelled = error_of(lambda: assistant.call(TaskCancel(id=theirs.id)))
    assert not_seen.code is ErrorCode.NOT_FOUND and not_cancelled.code is ErrorCode.NOT_FOUND
    assert scheduler.get(theirs.id).state is TaskState.QUEUED
    waiting = assistant.stream(TaskWait(id=mine.id), timeout=10.0)
    assert assistant.call(TaskCancel(id=mine.id)).state is TaskState.CANCELLED
    (final,) = list(waiting)
    assert isinstance(final, TaskFinished) and final.state is TaskState.CANCELLED


def test_one_sessions_agents_hold_at_most_their_share_of_the_schedulers_streams(scheduler):
    """A hostile assistant opening task.wait streams by the hundred (on its own task) would take every
    stream the scheduler has and leave every other session's worker without task.work: past
    SESSION_STREAMS its waits are refused, and the ones it holds still end normally."""
    from baaaht.services.scheduler.service import SESSION_STREAMS

    host = scheduler.host
    host.identify("sess-greedy", role="assistant")
    task = scheduler.submit("nobody", "noop", session_id="sess-greedy")
    extra = 3
    refused: list[ErrorCode] = []
    finished: list[TaskState] = []

    async def wait_once(bus: AsyncBusClient) -> None:
        try:
            async for item in bus.stream(TaskWait(id=task.id), timeout=60.0):
                if isinstance(item, TaskFinished):
                    finished.append(item.state)
        except Exception as error:  # noqa: BLE001 - the refusal is what is counted
            refused.append(getattr(error, "code", error))

    async def storm() -> None:
        bus = AsyncBusClient(host.endpoints.agents, timeout=60.0)
        async with bus:
            waits = [asyncio.create_task(wait_once(bus)) for _ in range(SESSION_STREAMS + extra)]
            deadline = time.monotonic() + 30
            while len(refused) < extra and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert refused == [ErrorCode.RESOURCE_EXHAUSTED] * extra, refused
            await bus.call(TaskCancel(id=task.id))
            await asyncio.gather(*waits)

    run_async(storm(), 90, "a storm of task.wait streams")
    assert finished == [TaskState.CANCELLED] * SESSION_STREAMS


@contextlib.asynccontextmanager
async def four_hostile_sessions_at_their_cap(scheduler, role: str, streams_of):
    """Four sessions' agents of `role` each open SESSION_STREAMS + 1 streams (`await streams_of(bus,
    session)`: async iterators) until the scheduler refuses one RESOURCE_EXHAUSTED (their caps leave the
    total to four of them); the streams stay open while the block runs."""
    from baaaht.services.scheduler.service import SESSION_STREAMS

    refused: collections.Counter[str] = collections.Counter()

    async def hold(stream, session: str) -> None:
        try:
            async for _ in stream:
                pass
        except Exception as error:  # noqa: BLE001 - the refusal is what is counted
            assert getattr(error, "code", error) is ErrorCode.RESOURCE_EXHAUSTED, error
            refused[session] += 1

    held: list[asyncio.Task] = []
    async with contextlib.AsyncExitStack() as clients:
        try:
            for session in (f"sess-hostile-{n}" for n in range(4)):
                scheduler.host.identify(session, role=role)
                bus = await clients.enter_async_context(
                    AsyncBusClient(scheduler.host.endpoints.agents, timeout=60.0)
                )
                streams = await streams_of(bus, session)
                assert len(streams) == SESSION_STREAMS + 1
                held += [asyncio.create_task(hold(stream, session)) for stream in streams]
                deadline = time.monotonic() + 30
                while not refused[session] and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                assert refused[session], f"{session} was never refused"
            yield
        finally:
            for stream in held:
                stream.cancel()
            await asyncio.gather(*held, return_exceptions=True)


def test_hostile_sessions_opening_task_work_by_the_hundred_leave_another_sessions_worker_a_stream(scheduler):
    """Four sessions' workers each open task.work streams under new worker ids until refused: another
    session's worker still takes its task."""
    from baaaht.services.scheduler.service import SESSION_STREAMS

    async def work_streams(bus: AsyncBusClient, session: str) -> list:
        return [
            bus.stream(TaskWork(worker_id=f"{session}-{n}", queues=["hog"]), timeout=60.0)
            for n in range(SESSION_STREAMS + 1)
        ]

    async def storm() -> TaskAssignment:
        async with four_hostile_sessions_at_their_cap(scheduler, "worker", work_streams):
            scheduler.host.identify("sess-victim", role="worker")
            async with AsyncBusClient(scheduler.host.endpoints.agents, timeout=30.0) as victim:
                work = victim.stream(TaskWork(worker_id="victim", queues=["tools"]), timeout=30.0)
                await asyncio.to_thread(scheduler.submit, "tools", "noop", session_id="sess-victim")
                lease = await anext(aiter(work))
                await work.aclose()
                return lease

    lease = run_async(storm(), 120, "a storm of task.work streams")
    assert isinstance(lease, TaskAssignment) and lease.task_type == "noop"


def test_hostile_sessions_waiting_by_the_hundred_leave_another_sessions_assistant_a_wait(scheduler):
    """Four sessions' assistants each open task.wait streams on their own task until refused: another
    session's assistant still waits for its tool's task and hears how it ended."""
    from baaaht.services.scheduler.service import SESSION_STREAMS

    async def wait_streams(bus: AsyncBusClient, session: str) -> list:
        task = await asyncio.to_thread(scheduler.submit, "nobody", "noop", session_id=session)
        return [bus.stream(TaskWait(id=task.id), timeout=60.0) for _ in range(SESSION_STREAMS + 1)]

    async def storm() -> TaskFinished:
        async with four_hostile_sessions_at_their_cap(scheduler, "assistant", wait_streams):
            scheduler.host.identify("sess-victim", role="assistant")
            async with AsyncBusClient(scheduler.host.endpoints.agents, timeout=30.0) as victim:
                mine = await asyncio.to_thread(scheduler.submit, "nobody", "noop", session_id="sess-victim")
                # Refused, the wait would raise RESOURCE_EXHAUSTED (opened before or after the cancel:
                # a wait on a finished task takes a stream too, and answers how it ended).
                waiting = asyncio.create_task(anext(aiter(victim.stream(TaskWait(id=mine.id), timeout=30.0))))
                await asyncio.to_thread(scheduler.client.call, TaskCancel(id=mine.id))
                return await waiting

    final = run_async(storm(), 120, "a storm of task.wait streams from four sessions")
    assert isinstance(final, TaskFinished) and final.state is TaskState.CANCELLED


def test_outcomes_reported_together_are_each_recorded_once_or_refused_alone(scheduler):
    work = scheduler.client.stream(TaskWork(worker_id="batch", queues=["pair"], slots=2), timeout=30.0)
    tasks = [scheduler.submit("pair", "noop") for _ in range(2)]
    given = leases_of(work)
    leases = {lease.task_id: lease.lease_id for lease in (next(given), next(given))}
    first, second = (
        TaskComplete(task_id=t.id, lease_id=leases[t.id], outcome="succeeded", result=payload(n))
        for n, t in enumerate(tasks)
    )
    answer = scheduler.client.call(msgspec.structs.replace(first, more=[second, first]))
    assert [(r.lease_id, r.code) for r in answer.refused] == [
        (first.lease_id, ErrorCode.FAILED_PRECONDITION)  # its second report, in the same call
    ]
    for n, task in enumerate(tasks):
        done = scheduler.get(task.id)
        assert done.state is TaskState.SUCCEEDED and msgspec.msgpack.decode(done.result) == n
    work.close()


def test_tasks_submitted_in_one_call_are_all_stored_in_order_or_none_are(scheduler):
    def task(n: int, **fields) -> TaskSubmit:
        return TaskSubmit(queue="bulk", task_type="noop", payload=payload(n), **fields)

    nested = task(1, more=[task(2)])
    error = error_of(lambda: scheduler.client.call(task(0, more=[task(3), nested])))
    assert error.code is ErrorCode.INVALID_ARGUMENT and error.message.startswith("more[1]: ")
    assert scheduler.client.call(TaskList(queue="bulk")).tasks == []

    answer = scheduler.client.call(task(0, more=[task(n) for n in range(1, 5)]))
    results = [answer.task, *(result.task for result in answer.more)]
    assert [msgspec.msgpack.decode(t.payload) for t in results] == [0, 1, 2, 3, 4]
    stored = scheduler.client.call(TaskList(queue="bulk")).tasks
    assert [t.id for t in stored] == [t.id for t in results]
    assert {t.state for t in stored} == {TaskState.QUEUED}


class CountingBus:
    """A worker's bus that keeps the task.complete calls it makes."""

    def __init__(self, bus: AsyncBusClient):
        self.bus, self.completes = bus, []

    async def stream_to(self, request, each, **kwargs):
        await self.bus.stream_to(request, each, **kwargs)

    async def call(self, request, **kwargs):
        if isinstance(request, TaskComplete):
            self.completes.append(request)
        return await self.bus.call(request, **kwargs)


def test_a_workers_tasks_that_end_together_share_one_task_complete(scheduler):
    slots, started, release = 4, [], None

    async def held(task):
        started.append(task.id)
        if len(started) == slots:
            release.set()
        await release.wait()
        return task.id

    task_ids = [scheduler.submit("together", "held").id for _ in range(slots)]

    async def work_them() -> CountingBus:
        nonlocal release
        release = asyncio.Event()
        async with AsyncBusClient.for_config(scheduler.host.config, timeout=10.0) as client:
            bus = CountingBus(client)
            await work_until_finished(Worker(bus, ["together"], slots, {"held": held}), scheduler, task_ids)
        return bus

    bus = run_async(work_them(), 60, "4 tasks that end together")
    reported = [outcome.task_id for call in bus.completes for outcome in (call, *call.more)]
    assert sorted(reported) == sorted(task_ids)  # each once
    assert len(bus.completes) < slots, [len(call.more) for call in bus.completes]
    for task_id in task_ids:
        done = scheduler.get(task_id)
        assert done.state is TaskState.SUCCEEDED and msgspec.msgpack.decode(done.result) == task_id
