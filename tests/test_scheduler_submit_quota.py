"""An assistant's task.submit had no rate: with a cancel after each batch its tasks never reach
scheduler.session_max_unfinished, and each is a row kept scheduler.task_retention (7 days) with its
payload (up to 256 KiB) and a host event or two, so one assistant's loop filled the host's disk and
evicted the host's event history. Its submits now count against limits.session_tasks_per_minute."""

from __future__ import annotations

import pytest

from baaaht.bus.errors import BusError
from baaaht.bus.testing import error_of
from baaaht.schemas.errors import ErrorCode
from baaaht.schemas.tasks import RetryPolicy, TaskCancel, TaskSubmit
from baaaht.schemas.tools import TOOLS_QUEUE
from tests.scheduler_doubles import start_scheduler


@pytest.fixture
def scheduler(make_host):
    return start_scheduler(make_host)


def test_an_assistants_submits_count_against_its_sessions_quota_and_the_hosts_do_not(scheduler):
    scheduler.host.identify("sess-loop", role="assistant")
    assistant = scheduler.host.agent_client(timeout=30.0)
    batch = TaskSubmit(
        queue=TOOLS_QUEUE, task_type="exec", more=[TaskSubmit(queue=TOOLS_QUEUE, task_type="exec")] * 99
    )
    refused = None
    for _ in range(7):  # 100 tasks of 5 attempts (the default retry) a batch: past the 600 a minute
        try:
            submitted = assistant.call(batch)
        except BusError as error:
            refused = error
            break
        for result in [submitted, *submitted.more]:
            assistant.call(TaskCancel(id=result.task.id))  # never unfinished for long
    assert refused is not None and refused.code is ErrorCode.RESOURCE_EXHAUSTED, refused
    assert "limits.session_tasks_per_minute" in refused.message and "sess-loop" in refused.message
    assert (
        scheduler.submit("q", "t", session_id="sess-loop").session_id == "sess-loop"
    )  # the host's: no quota


def test_an_assistants_task_counts_as_every_attempt_its_retry_policy_allows(scheduler):
    # A worker of the same session failing each attempt at once makes it run them all at once: events,
    # and a rewrite of its row (with every attempt before) each time.
    scheduler.host.identify("sess-retries", role="assistant")
    assistant = scheduler.host.agent_client(timeout=30.0)
    many = RetryPolicy(maximum_attempts=1000, initial_interval=0.001, backoff_coefficient=1)
    refused = error_of(lambda: assistant.call(TaskSubmit(queue=TOOLS_QUEUE, task_type="exec", retry=many)))
    # more than a whole minute of the quota: no wait lets it in, so not RESOURCE_EXHAUSTED ('try later')
    assert refused.code is ErrorCode.INVALID_ARGUMENT, refused
    assert refused.message == (
        "1000 task attempts at once are more than limits.session_tasks_per_minute allows in a minute (600)"
    )
    assert refused.details == {"field": "retry.maximum_attempts", "session_id": "sess-retries"}
    batch = TaskSubmit(  # 121 tasks of 5 attempts
        queue=TOOLS_QUEUE, task_type="exec", more=[TaskSubmit(queue=TOOLS_QUEUE, task_type="exec")] * 120
    )
    refused = error_of(lambda: assistant.call(batch))
    assert refused.code is ErrorCode.INVALID_ARGUMENT and refused.details["field"] == "more", refused
    assert refused.message.startswith("605 task attempts at once")
    for _ in range(2):  # 2 x 300 attempts: the session's minute
        assistant.call(
            TaskSubmit(queue=TOOLS_QUEUE, task_type="exec", retry=RetryPolicy(maximum_attempts=300))
        )
    again = error_of(lambda: assistant.call(TaskSubmit(queue=TOOLS_QUEUE, task_type="exec")))
    assert again.code is ErrorCode.RESOURCE_EXHAUSTED and "try again in" in again.message
    assert "600 task attempts a minute" in again.message


def test_only_the_tasks_a_submit_creates_count_against_the_sessions_quota(make_host):
    """The attempts were charged before anything could refuse the submit: one refused for its payload
    or for the session's room (scheduler.session_max_unfinished), or a client's retry that its idempotency
    key answers with the task it made, spent the session's quota though no task was made."""
    limits = {"limits": {"session_tasks_per_minute": 10}, "scheduler": {"session_max_unfinished": 3}}
    scheduler = start_scheduler(make_host, limits)  # 10 attempts a minute: one back every 6 s
    scheduler.host.identify("sess-exact", role="assistant")
    assistant = scheduler.host.agent_client(timeout=30.0)

    def task(attempts: int, **fields) -> TaskSubmit:
        policy = RetryPolicy(maximum_attempts=attempts)
        return TaskSubmit(queue=TOOLS_QUEUE, task_type="exec", retry=policy, **fields)

    bad = error_of(lambda: assistant.call(task(10, payload=b"\xc1")))  # not msgpack
    assert bad.code is ErrorCode.INVALID_ARGUMENT, bad
    first = assistant.call(task(2, key="once"))
    for _ in range(3):  # the client retries: answered with the task its key made
        again = assistant.call(task(2, key="once"))
        assert again.duplicate and again.task.id == first.task.id
    batch = task(2, key="a", more=[task(2, key="b")])
    made = assistant.call(batch)  # 6 of the 10 spent; the session's room (3) is full
    for _ in range(2):
        again = assistant.call(batch)
        assert [r.duplicate for r in (again, *again.more)] == [True, True]
        assert [r.task.id for r in (again, *again.more)] == [r.task.id for r in (made, *made.more)]
    for _ in range(2):
        full = error_of(lambda: assistant.call(task(3)))
        assert "scheduler.session_max_unfinished" in full.message, full
    assistant.call(TaskCancel(id=first.task.id))
    assistant.call(task(4))  # the last 4 attempts of the minute
    assistant.call(TaskCancel(id=made.task.id))  # room for one more
    spent = error_of(lambda: assistant.call(task(5)))
    assert spent.code is ErrorCode.RESOURCE_EXHAUSTED and spent.details["kind"] == "tasks", spent
    assert "10 task attempts a minute (limits.session_tasks_per_minute)" in spent.message
