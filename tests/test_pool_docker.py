"""The warm pool with the real engine, real agent-image worker containers, the real scheduler and bus: a
tool call in a new session is served by a pooled container started before the session existed, the pool
refills, no container serves two sessions, and after the container manager is killed (-9) its pool
containers are found again: kept when healthy and unclaimed, removed otherwise, never leaked."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from baaaht.bus.testing import wait_for
from baaaht.schemas.containers import ContainerList, ContainerPoolStatus
from baaaht.schemas.sessions import SessionClose
from baaaht.schemas.tools import OUTPUT_DECODER, ToolExec, ToolReadFile
from baaaht.services.containers.ownership import LABEL_OWNER
from baaaht.services.containers.pool import CLAIMS_DIR, POOL_DIR
from baaaht.services.containers.workspaces import LoopMounts, Workspaces
from tests import container_support, ctl_runner
from tests.worker_support import WORKER_START, WorkerHost, settings

pytestmark = pytest.mark.docker

docker_client = container_support.docker_client

AGENT_UID = 1000


@pytest.fixture
def pooled(make_host, docker_client, agent_image):
    host = make_host(settings(agent_image, pool={"size": 1, "max": 2}))
    made = WorkerHost(host, docker_client)
    yield made
    made.cleanup()


def pool_of(made: WorkerHost):
    return made.bus.call(ContainerPoolStatus())


def ready(made: WorkerHost, count: int = 1, without: frozenset[str] = frozenset()) -> list[str]:
    """The ids of `count` ready pool containers (none of `without`), waited for."""

    def found():
        ids = [
            s.container_id
            for s in pool_of(made).slots
            if s.state == "ready" and s.container_id not in without
        ]
        return ids if len(ids) >= count else None

    return wait_for(found, WORKER_START, interval=0.2, what=f"{count} ready pool containers")


def session_with_file(made: WorkerHost, text: str) -> str:
    """A new session whose workspace holds notes.txt, written on the host before any worker runs."""
    session = made.session()
    config = made.host.config
    workspace = Workspaces(config.data_dir, config.workspace.size, LoopMounts()).ensure(session)
    path = os.path.join(workspace, "notes.txt")
    with open(path, "w") as f:
        f.write(text)
    os.chown(path, AGENT_UID, AGENT_UID)
    return session


def served_by(made: WorkerHost, session: str, call) -> tuple[str, str]:
    """(the worker that ran the call, its output's text)."""
    info = made.run(session, call)
    assert info.state.value == "succeeded", (info.state, info.error_type, info.error)
    output = OUTPUT_DECODER.decode(info.result)
    return info.attempts[-1].worker, getattr(output, "content", "")


def test_a_tool_call_in_a_new_session_is_served_by_a_warm_container(pooled, docker_client):
    [warm] = ready(pooled)
    started = docker_client.api.inspect_container(warm)["State"]["StartedAt"]
    session = session_with_file(pooled, "written on the host before the claim\n")

    worker, content = served_by(pooled, session, ToolReadFile(path="notes.txt"))

    assert content == "written on the host before the claim\n"
    assert worker.startswith(warm[:12])  # the worker library names itself by the container's host name
    [slot] = [s for s in pool_of(pooled).slots if s.container_id == warm]
    assert (slot.state, slot.session_id, slot.role) == ("claimed", session, "worker")
    assert docker_client.api.inspect_container(warm)["State"]["StartedAt"] == started  # not restarted
    listed = pooled.bus.call(ContainerList(session_id=session)).containers
    assert [c.id for c in listed] == [warm]  # no container was started for the session
    [fresh] = ready(pooled, without=frozenset({warm}))  # refilled
    status = json.loads(ctl_runner.invoke(pooled.host, "pool", "status", "--json").stdout)
    assert {s["container_id"]: s["state"] for s in status["slots"]} == {warm: "claimed", fresh: "ready"}
    table = ctl_runner.invoke(pooled.host, "pool", "status").stdout.splitlines()
    assert table[0].split() == ["SLOT", "CONTAINER", "STATE", "AGE", "SESSION"]
    assert any(row.split()[1:3] == [warm[:12], "claimed"] and row.split()[4] == session for row in table[1:])


def test_no_pool_container_serves_two_sessions(pooled, docker_client):
    resized = ctl_runner.invoke(pooled.host, "pool", "resize", "2", "--json")
    assert json.loads(resized.stdout)["size"] == 2
    ready(pooled, 2)
    first, second = pooled.session(), pooled.session()
    served = {}
    for session in (first, second):
        worker, _ = served_by(pooled, session, ToolExec(argv=["true"]))
        served[session] = worker[:12]
    assert served[first] != served[second]
    [mine] = [s.container_id for s in pool_of(pooled).slots if s.session_id == first]
    pooled.bus.call(SessionClose(session_id=first), timeout=60)
    wait_for(
        lambda: mine not in {c.id for c in docker_client.containers.list(all=True, sparse=True)},
        WORKER_START,
        what="the closed session's pool container to be destroyed",
    )
    ready(pooled, 2)
    third = pooled.session()
    worker, _ = served_by(pooled, third, ToolExec(argv=["true"]))
    assert worker[:12] not in served.values()  # never one that served a session


def test_after_a_crash_pool_containers_are_kept_or_removed_never_leaked(pooled, docker_client):
    ctl_runner.invoke(pooled.host, "pool", "resize", "2")
    ready(pooled, 2)
    session = session_with_file(pooled, "still here\n")
    served_by(pooled, session, ToolReadFile(path="notes.txt"))
    [claimed] = [s.container_id for s in pool_of(pooled).slots if s.session_id == session]
    healthy, broken = ready(pooled, 2)

    pooled.host.kill("baaaht.services.containers")  # SIGKILL: no on_stop, nothing tidied
    docker_client.api.kill(broken)  # dies while nobody watches
    pooled.host.start_service("baaaht.services.containers", service="container")

    def settled():
        slots = {s.container_id: s.state for s in pool_of(pooled).slots}
        # pool.size (1) again: a resize lasts until the container manager restarts
        return slots if broken not in slots and list(slots.values()).count("ready") == 1 else None

    slots = wait_for(settled, WORKER_START, interval=0.2, what="the pool to settle after the restart")
    assert slots[healthy] == "ready" and slots[claimed] == "claimed"
    _, content = served_by(pooled, session, ToolReadFile(path="notes.txt"))
    assert content == "still here\n"  # the claimed one still serves its session, with its workspace
    on_engine = {
        c.id
        for c in docker_client.containers.list(
            all=True,
            sparse=True,
            filters={"label": [f"{LABEL_OWNER}=pool", f"baaaht.install={pooled.install_id}"]},
        )
    }
    assert on_engine == set(slots)  # nothing leaked, nothing lost
    pool_dir = Path(pooled.host.run_dir) / POOL_DIR
    slot_dirs = {entry.name for entry in pool_dir.iterdir() if entry.name != CLAIMS_DIR}
    assert len(slot_dirs) == len(slots)
