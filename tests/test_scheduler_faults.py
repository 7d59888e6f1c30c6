"""The scheduler through failures: kill -9 of the scheduler under load, of a worker mid-task, and a broker
restart, with real processes."""

from __future__ import annotations

import collections
import signal
import threading
import time

import pytest

from baaaht.bus.errors import BusError
from baaaht.bus.testing import wait_for
from baaaht.schemas.sessions import SessionClose, SessionCreate, SessionDelete
from baaaht.schemas.tasks import (
    HEARTBEAT_TIMEOUT,
    TaskList,
    TaskScheduleAdd,
    TaskScheduleList,
    TaskState,
    TaskSubmit,
)
from tests.scheduler_doubles import FAST, Scheduler, start_scheduler
from tests.session_doubles import start_sessions_host

S = TaskState


@pytest.fixture
def scheduler(make_host):
    return start_scheduler(make_host)


def test_kill_9_of_the_scheduler_under_load_loses_no_acknowledged_task_and_completes_none_twice(scheduler):
    scheduler.start_worker("load", slots=4, name="w1")
    scheduler.start_worker("load", slots=4, name="w2")
    acknowledged: list[str] = []
    stop = threading.Event()
    submitter = scheduler.host.client(timeout=2.0)

    def submit_forever() -> None:
        while not stop.is_set():
            try:
                acknowledged.append(submitter.call(TaskSubmit(queue="load", task_type="noop")).task.id)
            except BusError:
                pass  # the scheduler is down: this submit was not acknowledged

    thread = threading.Thread(target=submit_forever, daemon=True)
    thread.start()
    try:
        for _round in range(3):
            count = len(acknowledged)
            wait_for(
                lambda count=count: len(acknowledged) >= count + 20, 30, what="submits to be acknowledged"
            )
            scheduler.host.kill("scheduler", signal.SIGKILL)
            scheduler.start()
    finally:
        stop.set()
        thread.join(10)
    client = scheduler.client
    expected = set(acknowledged)

    def all_succeeded() -> bool:
        done, cursor = set(), 0
        while True:
            page = client.call(TaskList(states=[S.SUCCEEDED], queue="load", limit=1000, cursor=cursor))
            done.update(t.id for t in page.tasks)
            if not page.next_cursor:
                return expected <= done
            cursor = page.next_cursor

    wait_for(all_succeeded, 60, interval=0.2, what=f"all {len(expected)} acknowledged tasks to succeed")
    with client.subscribe(["task.succeeded"], since=0) as events:
        counted: collections.Counter = collections.Counter()
        while (delivery := events.next(timeout=1.0)) is not None:
            counted[delivery.event.task_id] += 1
    assert not [task_id for task_id, n in counted.items() if n > 1], "a task was completed twice"


def test_kill_9_of_a_worker_mid_task_retries_it_on_another_after_the_lease(scheduler):
    scheduler.start_worker("k", name="doomed", worker_id="doomed")
    task = scheduler.submit("k", "hold_first")
    scheduler.wait_record("start", task.id)
    scheduler.start_worker("k", name="spare", worker_id="spare")
    scheduler.host.kill("doomed", signal.SIGKILL)
    done = scheduler.wait_state(task.id)
    assert done.state is S.SUCCEEDED
    first, second = done.attempts
    assert (first.worker, first.error_type) == ("doomed", HEARTBEAT_TIMEOUT)
    assert second.worker == "spare"


def test_after_a_broker_restart_workers_come_back_and_dispatch_resumes(scheduler):
    scheduler.start_worker("b", worker_id="steady")
    before = scheduler.submit("b", "noop")
    assert scheduler.wait_state(before.id).state is S.SUCCEEDED
    host = scheduler.host
    host.kill("broker", signal.SIGKILL)
    host.start_broker()
    scheduler.host.wait_service_up("task")
    after = wait_for(lambda: scheduler.submit("b", "noop"), 20, what="the scheduler to take submits again")
    assert scheduler.wait_state(after.id).state is S.SUCCEEDED
    assert scheduler.records("done", after.id)[0]["worker"] == "steady"


def test_a_worker_stream_does_not_hold_up_the_schedulers_stop(scheduler):
    """The runner cancels open streams when it starts draining: a worker's task.work never ends by itself,
    and waiting for it would hold every stop for the whole drain timeout (10 s)."""
    scheduler.start_worker("idle")
    process = scheduler.host.processes["scheduler"]
    began = time.monotonic()
    scheduler.host.kill("scheduler", signal.SIGTERM)
    assert process.returncode == 0
    assert time.monotonic() - began < 5.0


def test_sessions_that_ended_while_the_scheduler_was_down_have_their_tasks_cancelled(make_host):
    host = start_sessions_host(lambda overrides: make_host({**overrides, **FAST}))
    scheduler = Scheduler(host)
    scheduler.start()
    client = scheduler.client
    closed, deleted, still_open = (client.call(SessionCreate(owner="alice")).id for _ in range(3))
    tasks = {s: scheduler.submit("nobody", "noop", session_id=s).id for s in (closed, deleted, still_open)}
    for session_id in (closed, still_open):
        client.call(TaskScheduleAdd(queue="nobody", task_type="noop", every=3600, session_id=session_id))
    host.kill("scheduler", signal.SIGKILL)
    for session_id in (closed, deleted):
        client.call(SessionClose(session_id=session_id))  # its session.closed goes unheard
    client.call(SessionDelete(session_id=deleted))
    scheduler.start()
    for session_id in (closed, deleted):
        assert scheduler.wait_state(tasks[session_id]).state is S.CANCELLED
    assert scheduler.get(tasks[still_open]).state is S.QUEUED
    assert [s.session_id for s in client.call(TaskScheduleList()).schedules] == [still_open]
