"""Session scope for a real agent: a container of the agent image, started by the real container manager
(which issues its identity) on the real broker (which stamps it), calls the session service."""

from __future__ import annotations

import pytest

from baaaht.schemas.containers import (
    ContainerCreate,
    ContainerLogs,
    ContainerSpec,
    ContainerStart,
    ContainerWait,
)
from baaaht.schemas.sessions import SessionGet, SessionMessages, SessionSendMessage
from tests import container_support
from tests.test_containers_bus import SETTINGS, Orchestrator

docker_client = container_support.docker_client

pytestmark = pytest.mark.docker

# Run inside the container: each call's outcome on a line of its own.
PROBE = """
import os, sys
from baaaht.bus.client import BusClient
from baaaht.bus.errors import BusError
from baaaht.schemas.sessions import SessionGet, SessionMessages, SessionSendMessage
own, other = sys.argv[1], sys.argv[2]
bus = BusClient(os.environ["BAAAHT_BUS"], timeout=10)
for name, request in [
    ("own.send", SessionSendMessage(session_id=own, role="assistant", content="from the agent")),
    ("own.messages", SessionMessages(session_id=own)),
    ("other.messages", SessionMessages(session_id=other)),
    ("other.get", SessionGet(session_id=other)),
    ("other.send", SessionSendMessage(session_id=other, role="assistant", content="forged")),
]:
    try:
        bus.call(request)
        print(name, "OK", flush=True)
    except BusError as error:
        print(name, error.code.value, flush=True)
bus.close()
"""


@pytest.fixture
def orchestrator(make_host, docker_client):
    made = Orchestrator(make_host(SETTINGS), docker_client)
    yield made
    made.cleanup()


def test_an_agent_container_reads_and_writes_only_its_own_session(orchestrator, agent_image):
    bus = orchestrator.bus
    own, other = orchestrator.session(), orchestrator.session()
    bus.call(SessionSendMessage(session_id=other, content="bob's secret"))
    before = bus.call(SessionGet(session_id=other))
    spec = ContainerSpec(image=agent_image, command=["python3", "-c", PROBE, own, other])
    container = bus.call(ContainerCreate(spec=spec, session_id=own, role="assistant")).id
    bus.call(ContainerStart(id=container))
    assert bus.call(ContainerWait(id=container), timeout=60).exit_code == 0
    lines = [line.text for chunk in bus.stream(ContainerLogs(id=container)) for line in chunk.lines]
    assert lines == [
        "own.send OK",
        "own.messages OK",
        "other.messages PERMISSION_DENIED",
        "other.get PERMISSION_DENIED",
        "other.send PERMISSION_DENIED",
    ], lines
    (message,) = bus.call(SessionMessages(session_id=own)).messages
    assert message.sender == f"assistant/{container}" and message.metadata.container_id == container
    assert bus.call(SessionGet(session_id=other)) == before
