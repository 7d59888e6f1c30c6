"""The agent SDK in real containers of the agent image, started by the real container manager on a real
broker: an agent joins, survives a broker restart, exits non-zero once the bus is gone for longer than
its limit, and stops cleanly on SIGTERM."""

from __future__ import annotations

import threading

import pytest

from baaaht.schemas.config import Config
from baaaht.schemas.containers import (
    ContainerCreate,
    ContainerLogs,
    ContainerSpec,
    ContainerStart,
    ContainerStop,
    ContainerWait,
)
from baaaht.services.containers.docker_runtime import DockerRuntime
from tests import container_support
from tests.test_containers_bus import SETTINGS, Orchestrator

docker_client = container_support.docker_client

pytestmark = pytest.mark.docker

EXIT_BUS_LOST = 3  # baaaht.agent.main.EXIT_BUS_LOST
WAIT = 60.0  # seconds: a container start and a Python start on a busy machine


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


class AgentLog:
    """The agent's log lines, followed on the engine itself (the bus may be down meanwhile), read up to
    each line a test waits for; a wait that takes longer than WAIT closes the stream, which ends it."""

    def __init__(self, runtime: DockerRuntime, container: str):
        self.stream = runtime.logs(container, ContainerLogs(id=container, follow=True))
        self.lines = iter(self.stream)
        self.seen: list[str] = []

    def wait_for(self, text: str) -> str:
        give_up = threading.Timer(WAIT, self.stream.close)
        give_up.start()
        try:
            for line in self.lines:
                self.seen.append(line.text)
                if text in line.text:
                    return line.text
        finally:
            give_up.cancel()
        raise AssertionError(f"the agent's log ended without {text!r} within {WAIT}s: {self.seen}")

    def close(self) -> None:
        self.stream.close()


@pytest.fixture
def agent_log():
    runtime = DockerRuntime(Config())
    opened: list[AgentLog] = []

    def follow(container: str) -> AgentLog:
        opened.append(AgentLog(runtime, container))
        return opened[-1]

    yield follow
    for log in opened:
        log.close()
    runtime.close()


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
