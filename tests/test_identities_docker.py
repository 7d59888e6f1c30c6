"""Agent container identities with the real engine: the real broker, policy, session and container
services and Docker. The container manager writes a container's identity before it can start and
removes it when the engine says the container ended, and when its session closes."""

from __future__ import annotations

import pytest

from baaaht.bus.testing import wait_for
from baaaht.common.identity import IdentityStore
from baaaht.schemas.containers import ContainerCreate, ContainerDestroy, ContainerSpec, ContainerStart
from baaaht.schemas.sessions import SessionClose, SessionCreate
from tests import container_support
from tests.test_sessions_docker import host as host  # the fixture: broker, policy, sessions, containers

pytestmark = pytest.mark.docker

docker_client, busybox = container_support.docker_client, container_support.busybox


def test_an_agent_container_has_an_identity_from_creation_until_it_ends(host, docker_client, busybox):
    bus = host.client(timeout=60)
    identities = IdentityStore(host.run_dir)
    session = bus.call(SessionCreate(owner="tester")).id

    def create(role: str = "agent") -> str:
        spec = ContainerSpec(image=busybox, command=["sleep", "600"])
        return bus.call(ContainerCreate(spec=spec, session_id=session, role=role)).id

    killed, destroyed, closed = create("worker"), create(), create("assistant")
    identity = identities.get(killed)
    assert (identity.session_id, identity.role) == (session, "worker")  # before anything started it
    for container_id in (killed, destroyed, closed):
        bus.call(ContainerStart(id=container_id))
    # Ended behind the orchestrator's back: the engine's die event revokes it.
    docker_client.api.kill(killed)
    wait_for(lambda: identities.get(killed) is None, what="the killed container's identity to go")
    bus.call(ContainerDestroy(id=destroyed, force=True))
    assert identities.get(destroyed) is None
    assert identities.get(closed).role == "assistant"
    bus.call(SessionClose(session_id=session))
    assert identities.get(closed) is None
    assert list(identities.all()) == []
