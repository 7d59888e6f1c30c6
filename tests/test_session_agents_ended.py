"""A session that is closed or gone gets no agent and no workspace from a late trigger (a task.queued or
the sweep of queued tool calls after its close or delete), and no start is tried again and again."""

from __future__ import annotations

import os

from baaaht.schemas.sessions import SessionState
from baaaht.schemas.tasks import TaskQueued, TaskState
from baaaht.schemas.tools import TOOLS_QUEUE
from baaaht.services.containers.session_agents import WORKER
from tests.container_fakes import FakeSessions, session_info
from tests.test_containers_service import make_service, run_dir  # noqa: F401 - the fixture


def queued(session_id: str) -> TaskQueued:
    return TaskQueued(
        task_id="t1", queue=TOOLS_QUEUE, task_type="read_file", session_id=session_id, state=TaskState.QUEUED
    )


def test_a_late_tool_call_of_an_ended_session_starts_no_worker_and_makes_no_workspace(run_dir):  # noqa: F811
    sessions = FakeSessions(session_info("closed", SessionState.CLOSED))  # "gone" was deleted
    service = make_service(run_dir, agent_image="busybox:1", sessions=sessions)
    for session_id in ("closed", "gone"):
        service.on_task_queued(queued(session_id))
    service.session_agents.tend()
    assert service.runtime.containers == {}
    images = service.workspaces.images_dir
    assert not os.path.isdir(images) or os.listdir(images) == []
    for session_id in ("closed", "gone"):
        assert service.workspaces.path(session_id) is None
        assert service.session_agents.container_of(session_id, WORKER) == ""
    assert service.session_agents.next_due() is None  # given up, not tried again every minute


def test_an_open_sessions_worker_still_starts(run_dir):  # noqa: F811
    service = make_service(run_dir, agent_image="busybox:1", sessions=FakeSessions(session_info("s1")))
    service.on_task_queued(queued("s1"))
    service.session_agents.tend()
    assert service.session_agents.container_of("s1", WORKER) != ""
    assert service.workspaces.path("s1") is not None
