"""A session that is closed or gone gets no agent and no workspace from a late trigger (a task.queued or
the sweep of queued tool calls after its close or delete), and no start is tried again and again."""

from __future__ import annotations

import os
import threading
import time

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


def test_tending_waits_while_the_engine_is_down_instead_of_spinning(run_dir):  # noqa: F811
    """A tool call queued while the engine does not answer (its agents not yet taken up): the tending
    loop cannot start anything, and must sleep, not look again at once, round after round."""
    from baaaht.bus.background import Stopping
    from tests.container_fakes import FakeRuntime

    runtime = FakeRuntime()
    runtime.down_reason = "dockerd is restarting"
    service = make_service(run_dir, runtime, agent_image="busybox:1")
    assert not service.check_engine()
    service.on_task_queued(queued("s1"))
    looks = []
    next_due = service.session_agents.next_due
    service.session_agents.next_due = lambda: looks.append(1) or next_due()
    stopping = Stopping()
    tending = threading.Thread(target=service.tend_session_agents, args=(stopping,), daemon=True)
    tending.start()
    time.sleep(0.5)  # the rounds counted: a sleeping loop makes one or two in this time
    stopping.set()
    service.session_agents.wake.set()
    tending.join(timeout=5)
    assert not tending.is_alive()
    assert len(looks) <= 3, f"{len(looks)} rounds in 0.5 s"
