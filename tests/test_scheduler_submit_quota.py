"""An assistant's task.submit had no rate: with a cancel after each batch its tasks never reach
scheduler.session_max_unfinished, and each is a row kept scheduler.task_retention (7 days) with its
payload (up to 256 KiB) and a host event or two, so one assistant's loop filled the host's disk and
evicted the host's event history. Its submits now count against limits.session_tasks_per_minute."""

from __future__ import annotations

import pytest

from baaaht.bus.errors import BusError
from baaaht.schemas.errors import ErrorCode
from baaaht.schemas.tasks import TaskCancel, TaskSubmit
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
    for _ in range(7):  # 700 tasks: past limits.session_tasks_per_minute (600)
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
