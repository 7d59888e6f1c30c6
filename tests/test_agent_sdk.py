"""The agent SDK in real containers of the agent image, started by the real container manager on a real
broker: an agent joins, survives a broker restart, exits non-zero once the bus is gone for longer than
its limit, and stops cleanly on SIGTERM; the echo agent answers its session's user messages."""

from __future__ import annotations

import pytest

from baaaht.bus.testing import next_event
from baaaht.schemas.base import topic_of
from baaaht.schemas.containers import (
    ContainerCreate,
    ContainerSpec,
    ContainerStart,
    ContainerStop,
    ContainerWait,
)
from baaaht.schemas.sessions import SessionMessage, SessionMessages, SessionSendMessage
from tests import agent_support, container_support
from tests.test_containers_bus import SETTINGS, Orchestrator

docker_client, agent_log = container_support.docker_client, agent_support.agent_log

pytestmark = pytest.mark.docker

EXIT_BUS_LOST = 3  # baaaht.agent.main.EXIT_BUS_LOST
WAIT = agent_support.WAIT


@pytest.fixture
def orchestrator(make_host, docker_client):
    made = Orchestrator(make_host(SETTINGS), docker_client)
    yield made
    made.cleanup()


def start_agent(orchestrator: Orchestrator, session: str, image: str, *argv: str, **env: str) -> str:
    spec = ContainerSpec(image=image, command=["baaaht-agent", "--log-format", "text", *argv], env=env)
    container = orchestrator.bus.call(ContainerCreate(spec=spec, session_id=session)).id
    orchestrator.bus.call(ContainerStart(id=container))
    return container


def test_an_idle_agent_joins_and_stops_cleanly_on_sigterm(orchestrator, agent_image, agent_log):
    container = start_agent(orchestrator, orchestrator.session(), agent_image, "idle")
    agent_log(container).wait_for("joined the bus")
    orchestrator.bus.call(ContainerStop(id=container, timeout=20), timeout=WAIT)
    assert orchestrator.bus.call(ContainerWait(id=container), timeout=WAIT).exit_code == 0


def test_an_agent_rejoins_after_a_broker_restart(orchestrator, agent_image, agent_log):
    container = start_agent(orchestrator, orchestrator.session(), agent_image, "idle")
    log = agent_log(container)
    log.wait_for("joined the bus")
    host = orchestrator.host
    host.kill("broker")
    log.wait_for("lost the bus")
    host.start_broker()
    log.wait_for("back on the bus")
    host.wait_registered("container", host.processes["baaaht.services.containers"].pid)
    orchestrator.bus.call(ContainerStop(id=container, timeout=20), timeout=WAIT)
    assert orchestrator.bus.call(ContainerWait(id=container), timeout=WAIT).exit_code == 0


def test_an_agent_exits_non_zero_once_the_bus_is_gone_longer_than_its_limit(
    orchestrator, agent_image, agent_log
):
    container = start_agent(
        orchestrator, orchestrator.session(), agent_image, "idle", BAAAHT_BUS_LOSS_LIMIT="2s"
    )
    agent_log(container).wait_for("joined the bus")
    orchestrator.host.kill("broker")
    exit_code = orchestrator.docker.containers.get(container).wait(timeout=WAIT)["StatusCode"]
    assert exit_code == EXIT_BUS_LOST
    logs = orchestrator.docker.containers.get(container).logs().decode()
    assert "the bus is gone for too long" in logs and "no broker at" in logs


def test_the_echo_agent_answers_each_user_message_of_its_session(orchestrator, agent_image, agent_log):
    bus = orchestrator.bus
    session, other = orchestrator.session(), orchestrator.session()
    container = start_agent(orchestrator, session, agent_image, "echo")
    agent_log(container).wait_for("joined the bus")
    with bus.subscribe([topic_of(SessionMessage)]) as messages:
        bus.call(SessionSendMessage(session_id=other, content="not yours"))
        bus.call(SessionSendMessage(session_id=session, content="hello, agent"))

        def answer(delivery) -> bool:
            return delivery.event.message.role == "assistant"

        answered = next_event(messages, answer, timeout=WAIT, what="the echo agent's answer").event
    assert (answered.session_id, answered.message.content) == (session, "hello, agent")
    assert answered.message.sender.endswith(container)  # sent as itself: the broker stamped it
    assert [m.role for m in bus.call(SessionMessages(session_id=session)).messages] == ["user", "assistant"]
    assert [m.role for m in bus.call(SessionMessages(session_id=other)).messages] == ["user"]
