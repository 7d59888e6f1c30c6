"""The assistant in a real agent-image container, on a real broker with the session, container and
credential services, its model reached through the real egress proxy (the credential service's) in
front of the fake LLM: a user message answered with streamed partials and a stored answer, by each
provider; and without a credential, the clear message saying what to configure."""

from __future__ import annotations

import pytest

from baaaht.bus.testing import next_event
from baaaht.bus.testing.fake_llm import FakeLLM, say
from baaaht.schemas.base import topic_of
from baaaht.schemas.containers import ContainerCreate, ContainerSpec, ContainerStart
from baaaht.schemas.credentials import CredentialPut
from baaaht.schemas.sessions import SessionMessage, SessionMessages, SessionPartial, SessionSendMessage
from tests import agent_support, container_support
from tests.test_containers_bus import SETTINGS, Orchestrator

docker_client, agent_log = container_support.docker_client, agent_support.agent_log

pytestmark = pytest.mark.docker

WAIT = agent_support.WAIT
ANSWER = "Hello from the scripted model, streamed word by word."


def route(name: str, upstream: str, credential: str, path: str, inject: str) -> dict:
    return {
        "name": name,
        "upstream": upstream,
        "credential": credential,
        "inject": inject,
        "paths": [path],
        "roles": ["assistant"],
    }


@pytest.fixture
def upstream(tmp_path):
    with FakeLLM(tmp_path / "upstream", script=[[say(ANSWER)], [say(ANSWER)]]) as fake:
        yield fake


@pytest.fixture
def orchestrator(upstream, make_host, docker_client):  # the upstream outlives the host (its proxy)
    routes = [
        route("anthropic", upstream.url, "anthropic", "/v1/messages", "x-api-key"),
        route("openai", upstream.url, "openai", "/v1/chat/completions", "bearer"),
        route("keyless", upstream.url, "never-added", "/v1/messages", "x-api-key"),
    ]
    settings = {
        **SETTINGS,
        "egress": {"routes": routes, "ca_file": upstream.ca_file},
        "assistant": {"autostart": False},
    }
    made = Orchestrator(make_host(settings), docker_client)
    made.host.start_service("baaaht.services.credentials", service="credential")
    for name in ("anthropic", "openai"):
        made.bus.call(CredentialPut(name=name, kind="api_key", value=f"sk-test-{name}".encode()))
    yield made
    made.cleanup()


def start_assistant(orchestrator: Orchestrator, session: str, image: str, provider: str, route: str) -> str:
    env = {
        "BAAAHT_ASSISTANT_PROVIDER": provider,
        "BAAAHT_ASSISTANT_MODEL": "fake",
        "BAAAHT_ASSISTANT_ROUTE": route,
    }
    spec = ContainerSpec(image=image, command=["baaaht-agent", "--log-format", "text", "assistant"], env=env)
    container = orchestrator.bus.call(ContainerCreate(spec=spec, session_id=session, role="assistant")).id
    orchestrator.bus.call(ContainerStart(id=container))
    return container


def answer_of(orchestrator: Orchestrator, messages) -> SessionMessage:
    def stored_answer(delivery) -> bool:
        return delivery.event.message.role == "assistant" and bool(delivery.event.message.metadata.turn_end)

    return next_event(messages, stored_answer, timeout=WAIT, what="the assistant's stored answer").event


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
def test_the_assistant_streams_and_stores_its_answer_through_the_egress_proxy(
    orchestrator, agent_image, agent_log, upstream, provider
):
    bus = orchestrator.bus
    session = orchestrator.session()
    container = start_assistant(orchestrator, session, agent_image, provider, provider)
    agent_log(container).wait_for("serving")
    with (
        bus.subscribe([topic_of(SessionMessage)]) as messages,
        bus.subscribe([topic_of(SessionPartial)]) as partials,
    ):
        question = bus.call(SessionSendMessage(session_id=session, content="say hello"))
        answered = answer_of(orchestrator, messages)
        streamed = []
        while "".join(p.text for p in streamed) != ANSWER:
            streamed.append(next_event(partials, timeout=WAIT, what="the streamed partials").event)
    message = answered.message
    assert (answered.session_id, message.content, message.metadata.turn_end) == (session, ANSWER, "done")
    assert message.metadata.reply_to == question.id and message.sender.endswith(container)
    assert [p.seq for p in streamed] == list(range(1, len(streamed) + 1)) and len(streamed) > 1
    assert {(p.session_id, p.turn_id, p.kind) for p in streamed} == {
        (session, message.metadata.turn_id, "text")
    }
    (seen,) = upstream.requests
    assert seen.path == ("/v1/messages" if provider == "anthropic" else "/v1/chat/completions")
    assert (seen.headers.get("x-api-key") or seen.headers.get("authorization")).endswith(
        f"sk-test-{provider}"
    )
    stored = bus.call(SessionMessages(session_id=session)).messages
    assert [(m.role, m.content) for m in stored] == [("user", "say hello"), ("assistant", ANSWER)]


def test_without_a_credential_the_assistant_says_what_to_configure(
    orchestrator, agent_image, agent_log, upstream
):
    bus = orchestrator.bus
    session = orchestrator.session()
    container = start_assistant(orchestrator, session, agent_image, "anthropic", "keyless")
    agent_log(container).wait_for("serving")
    with bus.subscribe([topic_of(SessionMessage)]) as messages:
        bus.call(SessionSendMessage(session_id=session, content="hello?"))
        message = answer_of(orchestrator, messages).message
    assert (message.metadata.turn_end, message.metadata.is_error) == ("failed", True)
    assert "credential of the egress route `keyless`" in message.content
    assert "baaaht-ctl credentials add anthropic --kind api-key" in message.content
    assert upstream.requests == []  # refused by the proxy, nothing forwarded
