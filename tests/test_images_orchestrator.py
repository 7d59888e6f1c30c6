"""The orchestrator image runs the whole host: started as the README shows (the Docker socket, the run
directory at the same path on both sides, the data directory on a volume), it runs a session with an
agent container from the agent image it was built with."""

from __future__ import annotations

import shutil
import uuid

import docker
import pytest

from baaaht.bus.client import BusClient
from baaaht.bus.testing import short_run_dir, wait_for
from baaaht.common.endpoints import Endpoints
from baaaht.host import agent_images
from baaaht.schemas.bus import BusServices
from baaaht.schemas.config import BusConfig
from baaaht.schemas.containers import ContainerCreate, ContainerGet, ContainerSpec, ContainerStart
from baaaht.schemas.sessions import SessionCreate
from baaaht.services.containers.ownership import LABEL_SESSION
from tests import agent_support, container_support

docker_client, agent_log = container_support.docker_client, agent_support.agent_log

pytestmark = pytest.mark.docker

SERVICES = {"container", "session", "policy"}
START_TIMEOUT = 90.0  # seconds: supervisord, a broker and three services starting in a container
DOCKER_SOCKET = "/var/run/docker.sock"
DATA_DIR = "/var/lib/baaaht"


@pytest.fixture(scope="module")
def orchestrator_image(docker_client) -> str:
    return agent_images.ensure_orchestrator_image(docker_client)


@pytest.fixture
def orchestrator_container(docker_client, orchestrator_image):
    """The orchestrator image running as the README says, on a run directory of the test's own."""
    run_dir = short_run_dir("bo-")
    volume = f"baaaht-test-data-{uuid.uuid4().hex[:12]}"
    container = docker_client.containers.run(
        orchestrator_image,
        ["--run-dir", run_dir, "--log-format", "text"],
        detach=True,
        volumes={
            DOCKER_SOCKET: {"bind": DOCKER_SOCKET, "mode": "rw"},
            run_dir: {"bind": run_dir, "mode": "rw"},
            volume: {"bind": DATA_DIR, "mode": "rw"},
        },
        network_mode="none",
        pid_mode="host",  # the broker reads connecting agents' host pids (docs/IDENTITY.md)
        labels={container_support.TEST_LABEL: volume},
        init=True,
    )
    yield container, run_dir
    container.stop(timeout=20)
    container.remove(force=True)
    container_support.remove_volume(docker_client, volume)
    shutil.rmtree(run_dir, ignore_errors=True)


def test_the_orchestrator_image_runs_a_session_with_an_agent_container(
    docker_client, orchestrator_container, agent_log
):
    container, run_dir = orchestrator_container
    endpoints = Endpoints.for_config(BusConfig(run_dir=run_dir))
    bus = BusClient(endpoints.services, events_endpoint=endpoints.events, timeout=30)
    session = ""
    try:

        def services_up() -> bool:
            listed = bus.call(BusServices(), timeout=2).services
            up = {s.name for s in listed if any(i.healthy for i in s.instances)}
            return SERVICES <= up

        try:
            wait_for(services_up, START_TIMEOUT, interval=0.5, what="the orchestrator's services")
        except AssertionError as error:
            raise AssertionError(f"{error}\n{container.logs().decode(errors='replace')[-3000:]}") from None
        session = bus.call(SessionCreate(owner="tester")).id
        idle = ["baaaht-agent", "--log-format", "text", "idle"]
        spec = ContainerSpec(image=_agent_image_of(container), command=idle)
        agent = bus.call(ContainerCreate(spec=spec, session_id=session)).id
        bus.call(ContainerStart(id=agent))
        assert bus.call(ContainerGet(id=agent)).session_id == session
        agent_log(agent).wait_for("joined the bus")
        assert docker_client.containers.get(agent).status == "running"
    finally:
        bus.close()
        if session:
            container_support.remove_labelled(docker_client, f"{LABEL_SESSION}={session}")


def _agent_image_of(container: docker.models.containers.Container) -> str:
    """The agent image the orchestrator image names as its default (container.agent_image)."""
    env = dict(item.split("=", 1) for item in container.attrs["Config"]["Env"])
    image = env["ORCHESTRATOR_CONTAINER__AGENT_IMAGE"]
    assert image.startswith(agent_images.AGENT_REPOSITORY + ":")
    return image
