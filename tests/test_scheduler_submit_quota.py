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
    assert (
        refused.code is ErrorCode.RESOURCE_EXHAUSTED and "limits.session_tasks_per_minute" in refused.message
    )
    for _ in range(2):  # 2 x 300 attempts: the session's minute
        assistant.call(
            TaskSubmit(queue=TOOLS_QUEUE, task_type="exec", retry=RetryPolicy(maximum_attempts=300))
        )
    again = error_of(lambda: assistant.call(TaskSubmit(queue=TOOLS_QUEUE, task_type="exec")))
    assert again.code is ErrorCode.RESOURCE_EXHAUSTED and "try again in" in again.message
