"""The container manager as a real service process on a real broker, with the real policy and session
services, against the real Docker engine."""

from __future__ import annotations

import grp
import json
import time
import uuid

import pytest

from baaaht.bus.errors import BusError
from baaaht.bus.testing import code_of, next_event, wait_for
from baaaht.common.socket_group import DEFAULT_SOCKET_GROUP
from baaaht.schemas.base import split_topic
from baaaht.schemas.bus import BusServices
from baaaht.schemas.containers import (
    ContainerCreate,
    ContainerDestroy,
    ContainerExec,
    ContainerGet,
    ContainerHealthWait,
    ContainerImageExists,
    ContainerKill,
    ContainerList,
    ContainerLogs,
    ContainerReconcile,
    ContainerSpec,
    ContainerStart,
    ContainerStatsStream,
    ContainerStop,
    ContainerVolumeCreate,
    ContainerVolumeList,
    ContainerWait,
    Healthcheck,
    Mount,
)
from baaaht.schemas.errors import ErrorCode
from baaaht.schemas.policy import PolicyAuditTail
from baaaht.schemas.sessions import (
    SessionClose,
    SessionCreate,
    SessionDelete,
    SessionGet,
    SessionSettings,
    SessionState,
)
from baaaht.services.containers.install import FILE_NAME as INSTALL_FILE
from baaaht.services.containers.ownership import (
    LABEL_INSTALL,
    LABEL_MANAGED,
    LABEL_OWNER,
    LABEL_ROLE,
    LABEL_SESSION,
)
from baaaht.services.policy import audit
from tests import container_support

pytestmark = pytest.mark.docker

docker_client, busybox = container_support.docker_client, container_support.busybox

SETTINGS = {
    "policy": {"max_containers": 3},
    "container": {"orphan_grace": "0s", "reconcile_interval": "1h"},
}


class Orchestrator:
    """A broker plus the policy, session and container services; removes its containers at the end."""

    def __init__(self, host, docker_client, with_sessions: bool = True):
        self.host = host
        self.docker = docker_client
        host.start_service("baaaht.services.policy", service="policy")
        if with_sessions:
            host.start_service("baaaht.services.sessions", service="session")
        host.start_service("baaaht.services.containers", service="container")
        self.install_id = (host.data_dir / INSTALL_FILE).read_text().strip()
        self.bus = host.client(timeout=30)

    def session(self, **settings) -> str:
        return self.bus.call(SessionCreate(owner="tester", settings=SessionSettings(**settings))).id

    def create(self, session: str, image: str, script: str, **spec) -> str:
        request = ContainerCreate(
            spec=ContainerSpec(image=image, command=["sh", "-c", script], **spec), session_id=session
        )
        return self.bus.call(request).id

    def run(self, session: str, image: str, script: str) -> tuple[int, list[str]]:
        container = self.create(session, image, script)
        self.bus.call(ContainerStart(id=container))
        exit_code = self.bus.call(ContainerWait(id=container)).exit_code
        lines = [line.text for chunk in self.bus.stream(ContainerLogs(id=container)) for line in chunk.lines]
        return exit_code, lines

    def on_engine(self, session: str) -> list[str]:
        """The ids of the session's containers as the engine itself lists them."""
        listed = self.docker.containers.list(
            all=True, sparse=True, filters={"label": f"{LABEL_SESSION}={session}"}
        )
        return [container.id for container in listed]

    def volumes_on_engine(self, session: str) -> list[str]:
        listed = self.docker.api.volumes(filters={"label": f"{LABEL_SESSION}={session}"})
        return [volume["Name"] for volume in listed.get("Volumes") or []]

    def cleanup(self) -> None:
        container_support.remove_labelled(self.docker, f"{LABEL_INSTALL}={self.install_id}")
        container_support.remove_labelled_volumes(self.docker, f"{LABEL_INSTALL}={self.install_id}")


@pytest.fixture
def orchestrator(make_host, docker_client, busybox):
    made = Orchestrator(make_host(SETTINGS), docker_client)
    yield made
    made.cleanup()


def test_full_lifecycle_with_events(orchestrator, busybox):
    bus = orchestrator.bus
    session = orchestrator.session()
    with bus.subscribe(["container."]) as events:
        container = orchestrator.create(session, busybox, "echo hello; echo oops >&2; exit 3")
        info = bus.call(ContainerGet(id=container))
        assert info.state == "created" and info.session_id == session
        assert info.labels[LABEL_MANAGED] == "true" and info.labels[LABEL_INSTALL] == orchestrator.install_id
        assert info.labels[LABEL_ROLE] == "agent" and info.name.startswith("baaaht-agent-")
        listed = bus.call(ContainerList(session_id=session)).containers
        assert [c.id for c in listed] == [container]
        bus.call(ContainerStart(id=container))
        assert bus.call(ContainerWait(id=container)).exit_code == 3
        chunks = list(bus.stream(ContainerLogs(id=container)))
        # Each stream keeps its order; between the two the engine promises none.
        assert sorted((line.stream, line.text) for chunk in chunks for line in chunk.lines) == [
            ("stderr", "oops"),
            ("stdout", "hello"),
        ]
        assert bus.call(ContainerGet(id=container)).exit_code == 3
        bus.call(ContainerDestroy(id=container))
        assert code_of(lambda: bus.call(ContainerGet(id=container))) is ErrorCode.NOT_FOUND
        topics = []

        def up_to_removed(delivery) -> bool:
            if delivery.event.container_id == container:
                topics.append(split_topic(delivery.topic)[0])  # each is its session's: `<tag>/<session>`
            return topics[-1:] == ["container.removed"]

        next_event(events, up_to_removed, timeout=15, what="the container's container.removed")
    assert topics == ["container.created", "container.started", "container.died", "container.removed"]


def test_hardened_defaults_hold_inside_the_container(orchestrator, busybox):
    script = (
        "id -u; id -G; grep CapEff /proc/self/status; "
        "touch /probe 2>/dev/null && echo root-writable || echo root-read-only; "
        "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '; "
        'echo "$BAAAHT_BUS"; test -S /run/baaaht/agent/bus.sock && echo bus-socket-visible; '
        "touch /run/baaaht/agent/x 2>/dev/null && echo bus-dir-writable || echo bus-dir-read-only"
    )
    exit_code, lines = orchestrator.run(orchestrator.session(), busybox, script)
    assert exit_code == 0
    uid, groups, *rest = lines
    # The user's own group and the agent socket's dedicated group: never root's group 0.
    assert uid == "1000" and groups.split() == ["1000", str(grp.getgrnam(DEFAULT_SOCKET_GROUP).gr_gid)]
    assert rest == [
        "CapEff:\t0000000000000000",
        "root-read-only",
        "lo",
        "ipc:///run/baaaht/agent/bus.sock",
        "bus-socket-visible",
        "bus-dir-read-only",
    ]


def test_logs_follow_and_stats_stream_end_when_cancelled(orchestrator, busybox):
    bus = orchestrator.bus
    container = orchestrator.create(orchestrator.session(), busybox, "echo one; echo two; sleep 600")
    bus.call(ContainerStart(id=container))
    follower = bus.stream(ContainerLogs(id=container, follow=True), timeout=600)
    texts = []
    for chunk in follower:
        texts += [line.text for line in chunk.lines]
        if len(texts) == 2:
            break
    follower.close()  # cancels the call on the service
    assert texts == ["one", "two"]
    samples = bus.stream(ContainerStatsStream(id=container, interval=1.0), timeout=600)
    first, second = next(samples), next(samples)
    samples.close()
    assert first.pids >= 1 and first.memory_limit > 0 and second.time > first.time

    def nothing_in_flight() -> bool:
        services = bus.call(BusServices(service="container")).services
        return all(instance.in_flight == 0 for service in services for instance in service.instances)

    # Both handlers saw the cancellation and ended: the follow would otherwise last 600 s.
    wait_for(nothing_in_flight, what="the cancelled streams to end on the service")
    bus.call(ContainerStop(id=container, timeout=5))
    assert bus.call(ContainerGet(id=container)).state == "exited"


def test_health_wait_returns_once_healthy(orchestrator, busybox):
    bus = orchestrator.bus
    check = Healthcheck(test=["CMD-SHELL", "test -e /tmp/ready"], interval=0.2, timeout=2, retries=20)
    container = orchestrator.create(
        orchestrator.session(), busybox, "sleep 1; touch /tmp/ready; sleep 600", healthcheck=check
    )
    bus.call(ContainerStart(id=container))
    report = bus.call(ContainerHealthWait(id=container, retries=100, interval=0.2))
    assert report.status == "healthy" and report.has_healthcheck


def test_a_container_killed_behind_our_back_yields_died(orchestrator, busybox, docker_client):
    bus = orchestrator.bus
    container = orchestrator.create(orchestrator.session(), busybox, "sleep 600")
    with bus.subscribe(["container.died"]) as events:
        bus.call(ContainerStart(id=container))
        docker_client.api.kill(container, signal="SIGKILL")  # straight at the engine
        died = next_event(events, timeout=15, what="container.died")
    assert died.event.container_id == container and died.event.exit_code == 137


def test_the_quota_refuses_a_fourth_container(orchestrator, busybox):
    bus = orchestrator.bus
    session = orchestrator.session()
    made = [orchestrator.create(session, busybox, "sleep 600") for _ in range(3)]
    with pytest.raises(BusError) as caught:
        orchestrator.create(session, busybox, "sleep 600")
    assert caught.value.code is ErrorCode.RESOURCE_EXHAUSTED and "3 of 3" in caught.value.message
    # The session forgets the container on `container.removed`; until then it still counts there.
    with bus.subscribe(["session.updated"]) as updates:
        bus.call(ContainerDestroy(id=made[0], force=True))
        next_event(
            updates,
            lambda d: d.event.session.id == session and len(d.event.session.containers) == 2,
            timeout=15,
            what="the session.updated of the detach",
        )
    orchestrator.create(session, busybox, "true")


def test_a_session_gets_at_most_max_containers_and_none_once_closed(orchestrator, busybox):
    bus = orchestrator.bus
    session = orchestrator.session(max_containers=1)
    first = orchestrator.create(session, busybox, "sleep 600")
    assert [c.id for c in bus.call(SessionGet(session_id=session)).containers] == [first]
    with pytest.raises(BusError) as caught:
        orchestrator.create(session, busybox, "sleep 600")
    assert caught.value.code is ErrorCode.RESOURCE_EXHAUSTED and "max_containers is 1" in caught.value.message
    assert orchestrator.on_engine(session) == [first]  # the refused container was removed before the answer
    assert bus.call(SessionClose(session_id=session), timeout=60).state is SessionState.CLOSED
    assert orchestrator.on_engine(session) == []
    with pytest.raises(BusError) as caught:
        orchestrator.create(session, busybox, "true")
    assert caught.value.code is ErrorCode.FAILED_PRECONDITION
    assert f"session {session} is closed" in caught.value.message
    assert orchestrator.on_engine(session) == []
    with pytest.raises(BusError) as caught:
        orchestrator.create("no-such-session", busybox, "true")
    assert caught.value.code is ErrorCode.NOT_FOUND and "no session no-such-session" in caught.value.message


def test_the_policy_judges_as_the_sessions_owner_under_its_allowed_images(orchestrator, busybox):
    session = orchestrator.session(allowed_images=["elsewhere.example/only/*"])
    with pytest.raises(BusError) as caught:
        orchestrator.create(session, busybox, "true")
    assert (
        caught.value.code is ErrorCode.PERMISSION_DENIED
        and "image.not_allowed" in caught.value.details["rules"]
    )
    assert orchestrator.on_engine(session) == []
    audit_log = orchestrator.host.data_dir / "audit" / "policy.jsonl"
    decisions = [json.loads(line) for line in audit_log.read_text().splitlines()]
    assert [d["principal"] for d in decisions if d["action"] == "container.create"] == [
        {"user": "tester", "session_id": session, "role": "agent"}
    ]


def test_the_policy_denies_root_and_unpinned_images(orchestrator, busybox):
    session = orchestrator.session()
    with pytest.raises(BusError) as caught:
        orchestrator.create(session, busybox, "true", user="0:0")
    assert (
        caught.value.code is ErrorCode.PERMISSION_DENIED and "security.root" in caught.value.details["rules"]
    )
    with pytest.raises(BusError) as caught:
        orchestrator.create(session, "busybox", "true")
    assert (
        caught.value.code is ErrorCode.PERMISSION_DENIED
        and "image.latest_tag" in caught.value.details["rules"]
    )
    assert orchestrator.bus.call(ContainerList(session_id=session)).containers == []


def test_without_the_policy_service_nothing_is_created(orchestrator, busybox):
    orchestrator.host.kill("baaaht.services.policy")
    with pytest.raises(BusError) as caught:
        orchestrator.create(orchestrator.session(), busybox, "true")
    assert caught.value.code is ErrorCode.UNAVAILABLE and "policy service" in caught.value.message
    assert orchestrator.bus.call(ContainerList()).containers == []


def test_reconcile_removes_orphans_of_this_install_only(orchestrator, busybox, docker_client):
    bus = orchestrator.bus
    kept = orchestrator.create(orchestrator.session(), busybox, "sleep 600")
    ours = {LABEL_MANAGED: "true", LABEL_INSTALL: orchestrator.install_id}
    # Left behind by a crash: ours, but its session no longer exists.
    orphan = docker_client.containers.create(
        busybox, ["sleep", "600"], labels={**ours, LABEL_SESSION: "gone"}, network_mode="none"
    )
    orphan.start()
    # A warm-pool slot and a system container have no session, and are not orphans for that.
    pooled, system = (
        docker_client.containers.create(
            busybox, ["sleep", "600"], labels={**ours, LABEL_OWNER: kind}, network_mode="none"
        )
        for kind in ("pool", "system")
    )
    foreign = docker_client.containers.create(
        busybox,
        ["sleep", "600"],
        labels={LABEL_MANAGED: "true", LABEL_INSTALL: uuid.uuid4().hex, LABEL_SESSION: "gone"},
        network_mode="none",
    )
    try:
        report = bus.call(ContainerReconcile())
        assert report.skipped == "" and [r.id for r in report.removed] == [orphan.id]
        assert "session gone does not exist" in report.removed[0].reason
        assert code_of(lambda: bus.call(ContainerGet(id=orphan.id))) is ErrorCode.NOT_FOUND
        assert bus.call(ContainerGet(id=kept)).state == "created"
        assert report.kept == 3  # the session's container, the pool slot, the system container
        listed = {c.id for c in bus.call(ContainerList()).containers}
        assert listed == {kept, pooled.id, system.id}
        foreign.reload()  # still there, untouched
        assert foreign.status == "created"
    finally:
        foreign.remove(force=True)


def test_a_session_mounts_only_the_volumes_made_for_it(orchestrator, busybox, docker_client):
    bus = orchestrator.bus
    mine, other = orchestrator.session(), orchestrator.session()
    volume = bus.call(ContainerVolumeCreate(session_id=mine)).name
    assert bus.call(ContainerVolumeCreate(session_id=mine)).name == volume  # made once
    assert orchestrator.volumes_on_engine(mine) == [volume]
    assert [v.name for v in bus.call(ContainerVolumeList(session_id=mine)).volumes] == [volume]

    # At /tmp the engine gives the new volume the image's /tmp mode (1777), so the agent user may write.
    workspace = Mount(type="volume", source=volume, target="/tmp")
    for script in ("echo kept > /tmp/file", "cat /tmp/file"):
        container = orchestrator.create(mine, busybox, script, mounts=[workspace])
        bus.call(ContainerStart(id=container))
        assert bus.call(ContainerWait(id=container)).exit_code == 0
    assert [line.text for chunk in bus.stream(ContainerLogs(id=container)) for line in chunk.lines] == [
        "kept"
    ]

    with pytest.raises(BusError) as caught:
        orchestrator.create(other, busybox, "cat /tmp/file", mounts=[workspace])
    assert caught.value.code is ErrorCode.PERMISSION_DENIED and "another session" in caught.value.message
    # A volume the orchestrator did not make is the policy's, which allows none by default; the
    # engine never gets to make it on the fly.
    free = f"baaaht-test-{uuid.uuid4().hex}"
    with pytest.raises(BusError) as caught:
        orchestrator.create(mine, busybox, "true", mounts=[Mount(type="volume", source=free, target="/x")])
    assert (
        caught.value.code is ErrorCode.PERMISSION_DENIED
        and "mount.volume.not_allowed" in caught.value.message
    )
    assert docker_client.api.volumes(filters={"name": free}).get("Volumes") in (None, [])


def test_session_volumes_are_removed_with_their_session(orchestrator, busybox, docker_client):
    bus = orchestrator.bus
    session = orchestrator.session()
    volume = bus.call(ContainerVolumeCreate(session_id=session, name="scratch")).name
    user = orchestrator.create(
        session, busybox, "true", mounts=[Mount(type="volume", source=volume, target="/s")]
    )
    assert bus.call(SessionClose(session_id=session), timeout=60).state is SessionState.CLOSED
    assert orchestrator.volumes_on_engine(session) == [volume]  # its files outlive the close
    assert code_of(lambda: bus.call(ContainerGet(id=user))) is ErrorCode.NOT_FOUND
    bus.call(SessionDelete(session_id=session))
    wait_for(lambda: orchestrator.volumes_on_engine(session) == [], what="the deleted session's volume to go")

    # Missed while the container manager was away: reconcile removes what a gone session left.
    left = docker_client.api.create_volume(
        name=f"baaaht-test-{uuid.uuid4().hex}",
        labels={LABEL_MANAGED: "true", LABEL_INSTALL: orchestrator.install_id, LABEL_SESSION: "gone"},
    )["Name"]
    report = bus.call(ContainerReconcile())
    assert report.removed_volumes == [left] and report.failed_volumes == []
    assert docker_client.api.volumes(filters={"name": left}).get("Volumes") in (None, [])


def test_reconcile_removes_nothing_without_the_session_service(make_host, docker_client, busybox):
    orchestrator = Orchestrator(make_host(SETTINGS), docker_client, with_sessions=False)
    try:
        orphan = docker_client.containers.create(
            busybox,
            ["true"],
            labels={LABEL_MANAGED: "true", LABEL_INSTALL: orchestrator.install_id, LABEL_SESSION: "gone"},
            network_mode="none",
        )
        report = orchestrator.bus.call(ContainerReconcile())
        assert "session service could not be asked" in report.skipped and report.removed == []
        orphan.reload()
        assert "reconcile skipped" in orchestrator.host.log("baaaht.services.containers")
    finally:
        orchestrator.cleanup()


def test_an_engine_that_is_not_there_gives_unavailable_not_a_hang(make_host):
    host = make_host({"docker": {"host": "unix:///tmp/baaaht-no-engine.sock"}})
    host.start_service("baaaht.services.containers", service="container")
    bus = host.client(timeout=10)
    started = time.monotonic()
    for request in (ContainerList(), ContainerImageExists(image="x:1"), ContainerKill(id="abc")):
        with pytest.raises(BusError) as caught:
            bus.call(request)
        assert caught.value.code is ErrorCode.UNAVAILABLE and "baaaht-no-engine.sock" in caught.value.message
    assert time.monotonic() - started < 10  # each call answered before its own deadline
    [service] = bus.call(BusServices(service="container")).services
    assert not service.instances[0].healthy and "baaaht-no-engine.sock" in service.instances[0].reason


def test_exec_is_audited_with_who_asked_and_on_whose_behalf(orchestrator, busybox):
    bus = orchestrator.bus
    container = orchestrator.create(orchestrator.session(), busybox, "sleep 600")
    bus.call(ContainerStart(id=container))
    assert (
        bus.call(ContainerExec(id=container, command=["echo", "hi"], env={"TOKEN": "s3cret"})).stdout
        == "hi\n"
    )
    records = [r for batch in bus.stream(PolicyAuditTail(limit=100)) for r in batch.records]
    (record,) = [r for r in records if r.action == "container.exec"]
    assert (record.container_id, record.decision, record.env_names) == (container, "allow", ["TOKEN"])
    assert record.asked_by.service == "container"  # the container manager asked, for the operator
    assert record.principal.role == "operator" and record.principal.user.startswith("operator/uid=")
    assert b"s3cret" not in audit.log_path(orchestrator.host.data_dir).read_bytes()
