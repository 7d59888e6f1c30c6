"""A whole host for the assistant end to end: the broker and every service as their own processes (policy,
session, credential with its egress proxy, scheduler, container manager on the real engine), the fake
LLM on loopback (TLS, a test CA) as the only upstream, reached only through the egress proxy. The
container manager starts each session's assistant and worker from the agent image."""

from __future__ import annotations

import os
from pathlib import Path

from baaaht.bus.errors import BusError
from baaaht.bus.testing import next_event
from baaaht.bus.testing.fake_llm import FakeLLM
from baaaht.bus.testing.host import HOST_SERVICES
from baaaht.schemas.base import session_topic
from baaaht.schemas.containers import ContainerList
from baaaht.schemas.credentials import CredentialPut
from baaaht.schemas.sessions import (
    Message,
    SessionClose,
    SessionCreate,
    SessionDelete,
    SessionMessage,
    SessionPartial,
    SessionSendMessage,
)
from baaaht.services.containers.install import FILE_NAME as INSTALL_FILE
from baaaht.services.containers.ownership import LABEL_INSTALL
from baaaht.services.containers.workspaces import LoopMounts, Workspaces
from tests import container_support

ANSWER_TIMEOUT = 240.0  # seconds: cold assistant and worker container starts on a busy, shared 2-core machine
AGENT_UID = 1000


def anthropic_route(upstream: str) -> dict:
    return {
        "name": "anthropic",
        "upstream": upstream,
        "credential": "anthropic",
        "inject": "x-api-key",
        "paths": ["/v1/messages"],
        "roles": ["assistant"],
        "usage": "anthropic",
    }


class AssistantHost:
    """The host, its fake LLM (`llm`, scripted by the test) and an operator client (`bus`)."""

    def __init__(
        self,
        make_host,
        docker_client,
        agent_image: str,
        directory: Path,
        *,
        script: list | None = None,
        assistant: dict | None = None,
        policy_path: str = "",
        credential: bool = True,
    ):
        self.docker = docker_client
        self.llm = FakeLLM(directory / "llm", script=list(script or []))
        self.llm.__enter__()
        overrides = {
            "policy": {"max_containers": 8, **({"path": policy_path} if policy_path else {})},
            "container": {"agent_image": agent_image, "orphan_grace": "0s", "reconcile_interval": "1h"},
            "egress": {"routes": [anthropic_route(self.llm.url)], "ca_file": str(self.llm.ca_file)},
            "assistant": assistant or {},
            "pool": {"size": 0},  # cold starts only: fewer containers on a shared machine
        }
        self.host = make_host(overrides)
        self.install_id = ""
        self.sessions: list[str] = []
        try:
            for module, name in HOST_SERVICES:
                self.host.start_service(module, name)
            self.install_id = (self.host.data_dir / INSTALL_FILE).read_text().strip()
            self.bus = self.host.client(timeout=30)
            if credential:
                self.bus.call(CredentialPut(name="anthropic", kind="api_key", value=b"sk-ant-e2e-not-real"))
        except BaseException:
            self.cleanup()
            raise

    def cleanup(self) -> None:
        for session_id in self.sessions:  # deleting a session unmounts and removes its workspace
            try:
                self.bus.call(SessionClose(session_id=session_id), timeout=60)
                self.bus.call(SessionDelete(session_id=session_id))
            except BusError:
                pass  # its containers go below; a workspace left mounted is the host's to find
        if self.install_id:
            container_support.remove_labelled(self.docker, f"{LABEL_INSTALL}={self.install_id}")
        self.host.stop()
        self.llm.__exit__(None, None, None)

    def session(self) -> str:
        self.sessions.append(self.bus.call(SessionCreate(owner="tester", name="e2e")).id)
        return self.sessions[-1]

    def put_file(self, session_id: str, name: str, text: str) -> None:
        """A file in the session's workspace, mounted here as the container manager mounts it (the same
        call: it finds it mounted when the worker starts)."""
        config = self.host.config
        workspace = Path(Workspaces(config.data_dir, config.workspace.size, LoopMounts()).ensure(session_id))
        (workspace / name).write_text(text)
        os.chown(workspace / name, AGENT_UID, AGENT_UID)

    def ask(self, session_id: str, text: str) -> Message:
        return self.bus.call(SessionSendMessage(session_id=session_id, content=text))

    def ask_until_it_streams(self, session_id: str, text: str) -> Message:
        """Ask, and return once the answer has begun to stream (its first text partial)."""
        with self.bus.subscribe([session_topic(SessionPartial, session_id)], since=0) as partials:
            asked = self.ask(session_id, text)
            next_event(partials, lambda d: d.event.kind == "text", ANSWER_TIMEOUT, "the answer to stream")
        return asked

    def answer(self, session_id: str, asked: Message, timeout: float = ANSWER_TIMEOUT) -> list[Message]:
        """The messages answering `asked`, once a turn replying to it has ended (from the session's
        event history: nothing is missed however early it came)."""
        found: list[Message] = []

        def turn_ended(delivery) -> bool:
            message = delivery.event.message
            if message.metadata.reply_to == asked.id:
                found.append(message)
            return bool(message.metadata.reply_to == asked.id and message.metadata.turn_end)

        with self.bus.subscribe([session_topic(SessionMessage, session_id)], since=0) as events:
            next_event(events, turn_ended, timeout, f"the answer to {asked.content!r}")
        return found

    def containers(self, session_id: str, role: str) -> list[str]:
        listed = self.bus.call(ContainerList(session_id=session_id)).containers
        return [c.id for c in listed if c.role == role and c.state == "running"]
