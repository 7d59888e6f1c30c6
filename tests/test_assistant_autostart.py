"""The container manager starts a session's assistant: on its user message with assistant.autostart, and
after a restart for sessions still awaiting an answer (the service against written fakes)."""

from __future__ import annotations

import pytest

from baaaht.bus.errors import BusError, unavailable
from baaaht.schemas.config import AssistantConfig
from baaaht.schemas.sessions import Message, SessionMessage
from baaaht.services.containers.assistants import ASSISTANT
from baaaht.services.containers.session_agents import LABEL_SESSION_AGENT
from tests.container_fakes import FakeRuntime
from tests.test_containers_service import make_service, run_dir  # noqa: F401 - the fixture

AGENT_IMAGE = "busybox:1"  # an image the fake engine has


def said(role: str, session_id: str = "s1") -> SessionMessage:
    message = Message(id="m1", seq=1, time=1.0, role=role, content="hello")
    return SessionMessage(session_id=session_id, message=message)


def assistants_started(service) -> list[dict]:
    service.session_agents.tend()
    return [
        made
        for made in service.runtime.containers.values()
        if made["spec"].labels.get(LABEL_SESSION_AGENT) == ASSISTANT
    ]


def test_a_user_message_starts_the_sessions_assistant_once(run_dir):  # noqa: F811
    service = make_service(run_dir, agent_image=AGENT_IMAGE)
    service.on_session_message(said("user"))
    service.on_session_message(said("user"))
    (made,) = assistants_started(service)
    spec = made["spec"]
    assert (spec.image, spec.command, spec.args) == (AGENT_IMAGE, ["baaaht-agent"], ["assistant"])
    assert spec.env["BAAAHT_ASSISTANT_PROVIDER"] == "anthropic"
    assert spec.labels["baaaht.session"] == "s1" and spec.labels["baaaht.role"] == ASSISTANT
    assert made["state"] == "running"


def test_other_messages_and_autostart_off_start_nothing(run_dir):  # noqa: F811
    service = make_service(run_dir, agent_image=AGENT_IMAGE)
    service.on_session_message(said("assistant"))
    service.on_session_message(said("system"))
    assert assistants_started(service) == []
    off = make_service(run_dir, agent_image=AGENT_IMAGE, assistant=AssistantConfig(autostart=False))
    off.on_session_message(said("user"))
    assert assistants_started(off) == []


def test_without_any_image_nothing_is_attempted(run_dir):  # noqa: F811
    service = make_service(run_dir)
    service.on_session_message(said("user"))
    assert service.session_agents.container_of("s1", ASSISTANT) == ""
    assert service.session_agents.next_due() is None  # no start waits, none fails over and over


class Conversations:
    def __init__(self, *waiting: str):
        self.waiting = list(waiting)
        self.asked = 0
        self.down = False

    def awaiting_answer(self):
        self.asked += 1
        if self.down:
            raise unavailable("the session service is not there yet")
        return iter(self.waiting)


def test_after_a_start_sessions_awaiting_an_answer_get_their_assistant_once(run_dir):  # noqa: F811
    conversations = Conversations("s1")
    conversations.down = True
    service = make_service(run_dir, FakeRuntime(), agent_image=AGENT_IMAGE, conversations=conversations)
    with pytest.raises(BusError, match="not there yet"):  # the runner logs it and runs it again later
        service.resume_assistants()
    assert assistants_started(service) == []
    conversations.down = False
    service.resume_assistants()
    service.resume_assistants()
    assert len(assistants_started(service)) == 1
    assert conversations.asked == 2  # once more after the failure, then never again
