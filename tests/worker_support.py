"""A whole host for the worker's tests: broker, policy, sessions, scheduler and container manager, with
the agent image as the workers' image. A tool call goes the real way: task.submit on the `tools` queue,
the container manager starts the session's worker (a hardened agent-image container), the worker runs it
on the session's workspace and the task's result is the tool's."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import msgspec

from baaaht.bus.errors import BusError
from baaaht.bus.testing import Host, next_event, wait_for
from baaaht.schemas.containers import ContainerList
from baaaht.schemas.sessions import SessionClose, SessionCreate, SessionDelete, SessionSettings
from baaaht.schemas.tasks import (
    TERMINAL,
    RetryPolicy,
    TaskGet,
    TaskInfo,
    TaskProgressed,
    TaskState,
    TaskSubmit,
)
from baaaht.schemas.tools import OUTPUT_DECODER, TOOLS_QUEUE, ToolCall, ToolOutput, tool_name
from baaaht.services.containers.install import FILE_NAME as INSTALL_FILE
from baaaht.services.containers.ownership import LABEL_INSTALL
from baaaht.services.containers.session_agents import LABEL_SESSION_AGENT
from tests import container_support

WORKER_START = 90.0  # seconds: a container start and a Python start on a busy machine


def settings(agent_image: str, **more) -> dict:
    return {
        "policy": {"max_containers": 6},
        "container": {"orphan_grace": "0s", "reconcile_interval": "1h", "agent_image": agent_image},
        "scheduler": {"lease_timeout": "3s", "cancel_grace": "5s"},
        "pool": {"size": 0},  # cold starts: the warm pool's claims have tests of their own
        "session": {"sweep_interval": "500ms"},
        **more,
    }


class WorkerHost:
    def __init__(self, host: Host, docker_client):
        self.host = host
        self.docker = docker_client
        host.start_service("baaaht.services.policy", service="policy")
        host.start_service("baaaht.services.sessions", service="session")
        host.start_service("baaaht.services.scheduler", "scheduler", service="task")
        host.start_service("baaaht.services.containers", service="container")
        self.install_id = (host.data_dir / INSTALL_FILE).read_text().strip()
        self.bus = host.client(timeout=30)
        self.sessions: list[str] = []

    def session(self, **settings) -> str:
        request = SessionCreate(owner="tester", settings=SessionSettings(**settings))
        session = self.bus.call(request).id
        self.sessions.append(session)
        return session

    def workspace(self, session: str) -> Path:
        return self.host.data_dir / "workspaces" / session

    def submit(self, session: str, call: ToolCall, **fields) -> str:
        request = TaskSubmit(
            queue=TOOLS_QUEUE,
            task_type=tool_name(type(call)),
            payload=msgspec.msgpack.encode(call),
            session_id=session,
            **fields,
        )
        return self.bus.call(request).task.id

    def finished(self, task_id: str, timeout: float = WORKER_START) -> TaskInfo:
        return self.reached(task_id, TERMINAL, timeout)

    def reached(self, task_id: str, states, timeout: float = WORKER_START) -> TaskInfo:
        with self.bus.subscribe(["task."], since=None) as events:
            info = self.bus.call(TaskGet(id=task_id))
            if info.state not in states:
                next_event(
                    events,
                    lambda d: (
                        getattr(d.event, "task_id", "") == task_id
                        and getattr(d.event, "state", None) in states
                    ),
                    timeout,
                    f"task {task_id} to become {sorted(s.value for s in states)}",
                )
        return self.bus.call(TaskGet(id=task_id))

    def run(self, session: str, call: ToolCall, timeout: float = WORKER_START, **fields) -> TaskInfo:
        return self.finished(self.submit(session, call, **fields), timeout)

    def output(self, session: str, call: ToolCall, timeout: float = WORKER_START) -> ToolOutput:
        """The tool's result; the test fails naming the error if the call failed."""
        info = self.run(session, call, timeout)
        assert info.state is TaskState.SUCCEEDED, (info.state, info.error_type, info.error)
        return OUTPUT_DECODER.decode(info.result)

    def error(self, session: str, call: ToolCall) -> tuple[str, str]:
        """(error type, message) of a call that must fail at once, without retry."""
        info = self.run(session, call, retry=RetryPolicy(maximum_attempts=1))
        assert info.state is TaskState.FAILED, (info.state, info.result)
        assert len(info.attempts) == 1
        return info.error_type, info.error

    def output_of(self, session: str, task_id: str, text: str, timeout: float = WORKER_START) -> str:
        """The task's streamed exec output (from the event history) once it holds `text`."""
        seen: list[str] = []
        with self.bus.subscribe([f"task.progress/{session}"], since=0) as events:

            def holds(delivery) -> bool:
                event = delivery.event
                if isinstance(event, TaskProgressed) and event.task_id == task_id:
                    seen.append(OUTPUT_DECODER.decode(event.data).data)
                return text in "".join(seen)

            next_event(events, holds, timeout, f"output {text!r} of task {task_id}")
        return "".join(seen)

    def all_output(self, session: str, task_id: str) -> str:
        """The whole streamed exec output of a finished task (published before its end, so all in the
        event history that a subscription replays first)."""
        seen = []
        with self.bus.subscribe([f"task.progress/{session}"], since=0) as events:
            while (delivery := events.next(timeout=0.5)) is not None:
                if delivery.event.task_id == task_id:
                    seen.append(OUTPUT_DECODER.decode(delivery.event.data).data)
        return "".join(seen)

    def workers(self, session: str) -> list[str]:
        listed = self.bus.call(ContainerList(session_id=session, labels={LABEL_SESSION_AGENT: "worker"}))
        return [c.id for c in listed.containers if c.state == "running"]

    def worker(self, session: str) -> str:
        """The session's one running worker, waited for."""
        return wait_for(
            lambda: (found := self.workers(session)) and len(found) == 1 and found[0],
            WORKER_START,
            interval=0.25,
            what=f"session {session}'s worker",
        )

    def cleanup(self) -> None:
        """Delete the sessions (their workspaces go with them), stop the host, remove what is left of the
        containers, and unmount any workspace still mounted (a session that could not be deleted)."""
        for session in self.sessions:
            try:
                self.bus.call(SessionClose(session_id=session), timeout=60)
                self.bus.call(SessionDelete(session_id=session))
            except BusError:
                pass  # closed or deleted by the test already
        # The host goes first: a warm pool refills until its container manager is gone.
        self.host.stop()
        container_support.remove_labelled(self.docker, f"{LABEL_INSTALL}={self.install_id}")
        for session in self.sessions:
            path = self.workspace(session)
            if os.path.ismount(path):
                subprocess.run(["umount", str(path)], timeout=30, check=False)
