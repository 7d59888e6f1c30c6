"""Closing a session removes its containers from the real engine: the real broker, policy, session
and container services, and Docker."""

from __future__ import annotations

import uuid

import pytest

from baaaht.schemas.containers import (
    ContainerCreate,
    ContainerList,
    ContainerReconcile,
    ContainerSpec,
    ContainerStart,
)
from baaaht.schemas.sessions import SessionClose, SessionCreate, SessionGet, SessionState
from baaaht.services.containers.install import FILE_NAME as INSTALL_FILE
from baaaht.services.containers.ownership import LABEL_INSTALL, LABEL_SESSION
from tests import container_support
from tests.session_doubles import SESSION_LIMITS

pytestmark = pytest.mark.docker

docker_client, busybox = container_support.docker_client, container_support.busybox


@pytest.fixture
def host(make_host, docker_client):
    started = make_host(
        {
            "session": {**SESSION_LIMITS, "close_timeout": "30s"},
            "container": {"orphan_grace": "0s", "reconcile_interval": "1h"},
        }
    )
    started.start_service("baaaht.services.policy", service="policy")
    started.start_service("baaaht.services.sessions", service="session")
    started.start_service("baaaht.services.containers", service="container")
    install_id = (started.data_dir / INSTALL_FILE).read_text().strip()
    yield started
    container_support.remove_labelled(docker_client, f"{LABEL_INSTALL}={install_id}")


@pytest.fixture
def volume_image(docker_client, busybox):
    """busybox declaring a VOLUME: each of its containers gets an anonymous volume no spec names."""
    made = docker_client.api.create_container(busybox, command=["true"])
    repository, tag = "baaaht-test/busybox-volume", uuid.uuid4().hex[:12]
    docker_client.api.commit(made["Id"], repository=repository, tag=tag, changes=["VOLUME /data"])
    docker_client.api.remove_container(made["Id"])
    yield f"{repository}:{tag}"
    docker_client.api.remove_image(f"{repository}:{tag}", force=True)


def test_closing_a_session_stops_and_removes_its_containers_from_the_engine(
    host, docker_client, busybox, volume_image
):
    bus = host.client(timeout=60)
    session_id = bus.call(SessionCreate(owner="tester")).id
    other_session = bus.call(SessionCreate(owner="tester")).id

    def create(session: str, image: str = busybox) -> str:
        spec = ContainerSpec(image=image, command=["sleep", "600"])
        return bus.call(ContainerCreate(spec=spec, session_id=session)).id

    running, created_only = create(session_id), create(session_id, volume_image)
    bystander = create(other_session)
    mounts = docker_client.api.inspect_container(created_only)["Mounts"]
    [anonymous] = [m["Name"] for m in mounts if m["Type"] == "volume"]
    bus.call(ContainerStart(id=running))
    attached = {c.id for c in bus.call(SessionGet(session_id=session_id)).containers}
    assert attached == {running, created_only}

    info = bus.call(SessionClose(session_id=session_id, reason="done"), timeout=60)

    assert (info.state, info.containers) == (SessionState.CLOSED, [])
    on_engine = docker_client.containers.list(
        all=True, sparse=True, filters={"label": f"{LABEL_SESSION}={session_id}"}
    )
    assert on_engine == []
    # The image's anonymous volume went with its container: nothing else would ever find it.
    assert anonymous not in {v["Name"] for v in docker_client.api.volumes()["Volumes"] or []}
    assert bus.call(ContainerList(session_id=session_id)).containers == []
    assert [c.id for c in bus.call(ContainerList(session_id=other_session)).containers] == [bystander]
    # The container manager's reconcile finds nothing left of the closed session.
    report = bus.call(ContainerReconcile())
    assert report.skipped == "" and report.removed == []
    assert {running, created_only}.isdisjoint(
        c.id for c in docker_client.containers.list(all=True, sparse=True)
    )
