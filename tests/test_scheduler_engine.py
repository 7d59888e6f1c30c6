"""The scheduler's engine thread and its writer: the engine goes on while a commit runs; nothing is
answered before its commit; a failed commit refuses its turns and rebuilds the Core from the store."""

from __future__ import annotations

import contextlib
import queue
import sqlite3
import threading
import time

import pytest

from baaaht.bus.background import Stopping
from baaaht.bus.errors import BusError
from baaaht.bus.testing import wait_for
from baaaht.schemas.config import SchedulerConfig
from baaaht.schemas.errors import ErrorCode
from baaaht.schemas.tasks import TaskComplete, TaskScheduleAdd, TaskState, TaskSubmit, TaskWork
from baaaht.services.scheduler.engine import RELOAD_PAUSE, TOLD_TRIES, Engine
from baaaht.services.scheduler.store import SchedulerStore
from tests.sqlite_faults import FailingCommit

WAIT = 10.0


class GatedStore(SchedulerStore):
    """A real store whose commits wait for `gate` (inside the transaction) and can be made to fail."""

    def __init__(self, path: str):
        super().__init__(path)
        self.gate = threading.Event()
        self.gate.set()
        self.committing = threading.Event()  # set when a commit reaches the gate
        self.fail_next = False

    @contextlib.contextmanager
    def batch(self):
        with super().batch() as batch:
            yield batch
            self.committing.set()
            assert self.gate.wait(WAIT)
            if self.fail_next:
                self.fail_next = False
                raise sqlite3.OperationalError("disk I/O error")


class Events:
    def __init__(self):
        self.published = []

    def publish(self, event, subtopic: str = "") -> None:
        self.published.append(event)


@pytest.fixture
def engine(tmp_path):
    store = GatedStore(str(tmp_path / "tasks.db"))
    events = Events()
    engine = Engine(store, SchedulerConfig(), events)
    engine.load()
    stopping = Stopping()
    thread = threading.Thread(target=engine.run, args=(stopping,), daemon=True)
    thread.start()
    yield engine, store, events
    store.gate.set()
    stopping.set()
    thread.join(WAIT)
    assert not thread.is_alive()
    store.close()


def in_thread(call):
    """Run `call()` in a thread; the thread and a dict that gets its result or error."""
    out: dict = {}

    def run():
        try:
            out["result"] = call()
        except BusError as exc:
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def submit(engine: Engine, queue: str = "q"):
    return engine.call(lambda core, now: core.submit(TaskSubmit(queue=queue, task_type="t"), "", now)[0])


def test_the_engine_leases_the_next_task_while_a_commit_runs_and_answers_only_after_it(engine):
    engine, store, events = engine
    leases = []
    lease_seen = threading.Semaphore(0)

    def push(assignment):
        leases.append(assignment)
        lease_seen.release()

    work = TaskWork(worker_id="w", queues=["q"], slots=2)
    engine.call(lambda core, now: core.work_open(work, None, push, object(), now))
    store.gate.clear()
    store.committing.clear()
    first, first_out = in_thread(lambda: submit(engine))
    assert lease_seen.acquire(timeout=WAIT) and store.committing.wait(WAIT)  # its commit is held
    second, second_out = in_thread(lambda: submit(engine))
    # The engine took the second submit and leased it while the first commit still waits.
    assert lease_seen.acquire(timeout=WAIT)
    assert len(leases) == 2 and first_out == {} and second_out == {}
    assert store.get(leases[0].task_id) is None  # nothing of it is committed yet
    store.gate.set()
    first.join(WAIT)
    second.join(WAIT)
    assert [out["result"].id for out in (first_out, second_out)] == [a.task_id for a in leases]
    assert {store.get(a.task_id).state for a in leases} == {TaskState.RUNNING}
    assert [type(e).__name__ for e in events.published].count("TaskQueued") == 2


def test_a_failed_commit_refuses_its_turns_and_the_core_is_rebuilt_from_the_store(engine):
    engine, store, events = engine
    kept = submit(engine)
    store.fail_next = True
    with pytest.raises(BusError) as caught:
        submit(engine, queue="lost")
    assert caught.value.code is ErrorCode.UNAVAILABLE
    after = submit(engine)  # the engine took up work again, on a Core that has what the store has
    queued = engine.call(lambda core, now: sorted(t.queue for t in core.tasks.values()))
    assert queued == ["q", "q"] and {kept.id, after.id} <= {t.id for t in store.list([], "", "", 10, 0)[0]}
    assert "lost" not in [getattr(e, "queue", "") for e in events.published]


def test_a_task_finished_in_a_turn_not_committed_yet_is_answered_finished_to_a_later_turn(engine):
    engine, store, _events = engine
    leases = []
    work = TaskWork(worker_id="w", queues=["q"], slots=1)
    engine.call(lambda core, now: core.work_open(work, None, leases.append, object(), now))
    task = submit(engine)
    done = TaskComplete(task_id=task.id, lease_id=leases[0].lease_id, outcome="succeeded")
    store.gate.clear()
    store.committing.clear()
    completing, completed = in_thread(lambda: engine.call(lambda core, now: core.complete(done, None, now)))
    assert store.committing.wait(WAIT)  # the outcome's commit is held: the store has the task running
    waiting, waited = in_thread(lambda: engine.call(lambda core, now: core.wait_open(task.id, None, print)))
    store.gate.set()
    completing.join(WAIT)
    waiting.join(WAIT)
    assert "error" not in completed and waited["result"].state is TaskState.SUCCEEDED


def test_a_deferred_answer_is_settled_only_once_its_change_is_committed(engine):
    engine, store, _events = engine
    store.gate.clear()
    store.committing.clear()
    answer = engine.defer(lambda core, now: core.submit(TaskSubmit(queue="q", task_type="t"), "", now)[0])
    assert store.committing.wait(WAIT)
    with pytest.raises(TimeoutError):
        answer.wait(0.2)  # applied, not durable yet: no answer
    store.gate.set()
    task = answer.wait(WAIT)
    assert store.get(task.id).state is TaskState.QUEUED


def test_a_failed_commit_ends_the_open_task_work_streams_so_their_workers_open_them_again(engine):
    """The rebuilt Core knows no open stream (a stream is no row): before, every worker connected then
    got no task until its stream's deadline (bus/worker.py STREAM_TIMEOUT, 10 minutes)."""
    engine, store, _events = engine
    old_stream: queue.SimpleQueue = queue.SimpleQueue()
    work = TaskWork(worker_id="w", queues=["q"], slots=1)
    engine.call(lambda core, now: core.work_open(work, None, old_stream.put, object(), now))
    store.fail_next = True
    with pytest.raises(BusError):
        submit(engine)
    pushed = []
    while (item := old_stream.get(timeout=WAIT)) is not None:  # the refused task's lease, then the end
        pushed.append(item)
    assert [a.kind for a in pushed] == ["lease"]
    new_stream: queue.SimpleQueue = queue.SimpleQueue()  # the worker opens its stream again
    engine.call(lambda core, now: core.work_open(work, None, new_stream.put, object(), now))
    task = submit(engine)
    assert new_stream.get(timeout=WAIT).task_id == task.id


def test_what_is_told_in_a_turn_a_failed_commit_undoes_is_applied_to_the_rebuilt_core(engine):
    """A `tell` has no caller to refuse: a session.closed told while a failing commit ran was dropped,
    and the closed session's tasks stayed queued (its schedules kept making more)."""
    engine, store, _events = engine
    task = engine.call(lambda core, now: core.submit(TaskSubmit(queue="q", task_type="t"), "s1", now)[0])
    store.gate.clear()
    store.committing.clear()
    store.fail_next = True
    failing, failed = in_thread(lambda: submit(engine))
    assert store.committing.wait(WAIT)
    turns = engine._turn_seq
    engine.tell(lambda core, now: core.session_closed("s1", now))
    wait_for(lambda: engine._turn_seq > turns, WAIT, what="the told change's turn")
    store.gate.set()
    failing.join(WAIT)
    assert failed["error"].code is ErrorCode.UNAVAILABLE
    wait_for(lambda: store.get(task.id).state is TaskState.CANCELLED, WAIT, what="the task cancelled")


class AlwaysFailing(GatedStore):
    """Once `failing`, every commit fails (a full disk); counts the Core's rebuilds."""

    failing = False
    reloads = 0

    @contextlib.contextmanager
    def batch(self):
        with super().batch() as batch:
            yield batch
            if self.failing:
                raise sqlite3.OperationalError("database or disk is full")

    def live_tasks(self):
        self.reloads += 1
        return super().live_tasks()


@pytest.fixture
def failing_engine(tmp_path):
    store = AlwaysFailing(str(tmp_path / "tasks.db"))
    engine = Engine(store, SchedulerConfig(), Events())
    engine.load()
    stopping = Stopping()
    thread = threading.Thread(target=engine.run, args=(stopping,), daemon=True)
    thread.start()
    yield engine, store
    stopping.set()
    thread.join(WAIT)
    assert not thread.is_alive()
    store.close()


def test_a_told_change_whose_commit_fails_every_time_is_given_up_after_a_few_tries(failing_engine):
    """A commit failing every time (disk full): the told change and the reload it causes went round
    and round, thousands of reloads of the whole store a second."""
    engine, store = failing_engine
    engine.call(lambda core, now: core.submit(TaskSubmit(queue="q", task_type="t"), "s1", now))
    store.failing = True
    engine.tell(lambda core, now: core.session_closed("s1", now))
    wait_for(lambda: store.reloads >= 1 + TOLD_TRIES, WAIT, what="the told change's tries")
    time.sleep(2.5 * RELOAD_PAUSE)  # a window for more: none come
    assert store.reloads == 1 + TOLD_TRIES


def test_the_core_is_rebuilt_at_most_once_a_reload_pause_while_every_commit_fails(failing_engine):
    """A schedule's run is due again as soon as the Core is rebuilt from a store that cannot take it:
    fail, rebuild, fire, fail... 2921 rebuilds (and logged tracebacks) a second on a full disk."""
    engine, store = failing_engine
    schedule = TaskScheduleAdd(queue="q", task_type="t", every=0.05)
    engine.call(lambda core, now: core.add_schedule(schedule, "", now))
    store.failing = True
    wait_for(lambda: store.reloads >= 2, WAIT, what="a first rebuild")
    time.sleep(2.5 * RELOAD_PAUSE)
    assert store.reloads <= 2 + 3


def test_a_commit_that_fails_with_its_transaction_left_open_is_rolled_back(engine):
    """Left open, the Core was rebuilt from the writer connection's uncommitted rows (the refused task
    among them) and every later BEGIN failed: within a transaction already."""
    engine, store, _events = engine
    db = store._db = FailingCommit(store._db)
    kept = submit(engine)
    db.fail_next = True
    with pytest.raises(BusError) as caught:
        submit(engine, queue="lost")
    assert caught.value.code is ErrorCode.UNAVAILABLE
    after = submit(engine)
    stored = {t.id: t.queue for t in store.list([], "", "", 10, 0)[0]}
    assert set(stored) == {kept.id, after.id} and "lost" not in stored.values()
