"""The warm pool against written fakes of the engine, the mount table, the policy and the session service:
filling, claiming (once, for one session), refilling, resizing, and finding everything again after a crash."""

from __future__ import annotations

import concurrent.futures
import os
import threading
import time

import pytest

from baaaht.bus.background import Stopping
from baaaht.bus.testing import FakeBus, code_of, context, error_of, operator_caller, service_caller
from baaaht.common.identity import IdentityStore
from baaaht.common.mounts import mount_points
from baaaht.schemas.config import BusConfig, Config, ContainerConfig, PolicyConfig, PoolConfig
from baaaht.schemas.containers import (
    ContainerDestroy,
    ContainerGet,
    ContainerList,
    ContainerPoolResize,
    ContainerPoolStatus,
)
from baaaht.schemas.errors import ErrorCode
from baaaht.schemas.sessions import SessionContainer, SessionState
from baaaht.services.containers import service as container_service
from baaaht.services.containers.ownership import LABEL_OWNER, OwnerKind, owner_labels
from baaaht.services.containers.pool import LABEL_POOL_SLOT, MAX_BACKOFF, WORKSPACE_TARGET, HostMounts
from baaaht.services.containers.service import ContainerService
from baaaht.services.containers.session_agents import LABEL_SESSION_AGENT
from tests.container_fakes import (
    FakeAgents,
    FakePolicy,
    FakeRuntime,
    FakeSessions,
    engine_event,
    session_info,
)
from tests.test_containers_service import create, fake_workspaces

INSTALL = "c" * 32
IMAGE = "baaaht/agent:test"
AGENT_GID = 4242


class FakeMounts:
    """The mount table: path -> the stack of sources mounted on it."""

    def __init__(self):
        self.table: dict[str, list[str]] = {}
        self.shared: set[str] = set()
        self.fail_bind = ""
        self.fail_share = ""

    def share(self, path: str) -> None:
        if self.fail_share:
            raise OSError(self.fail_share)
        self.shared.add(path)

    def bind(self, source: str, target: str) -> None:
        if self.fail_bind:
            raise OSError(self.fail_bind)
        assert os.path.isdir(target), f"bind onto a missing directory {target}"
        self.table.setdefault(target, []).append(source)

    def unmount(self, path: str) -> None:
        self.table.pop(path, None)

    def is_mounted(self, path: str) -> bool:
        return bool(self.table.get(path))


@pytest.fixture
def run_dir(tmp_path):
    agent = tmp_path / "run" / "agent"
    agent.mkdir(parents=True)
    os.chown(agent, -1, AGENT_GID)
    return tmp_path / "run"


def make_pool_service(
    run_dir, tmp_path, runtime=None, mounts=None, *, size=2, most=4, max_containers=10, **kw
):
    config = Config(
        data_dir=str(tmp_path / "data"),
        bus=BusConfig(run_dir=str(run_dir)),
        policy=PolicyConfig(max_containers=max_containers),
        container=ContainerConfig(orphan_grace=0, reconcile_interval=3600, agent_image=IMAGE),
        pool=PoolConfig(size=size, max=most),
    )
    sessions = kw.pop("sessions", FakeSessions(session_info("s1"), session_info("s2")))
    service = ContainerService(
        config,
        FakeRuntime(images=(IMAGE, "busybox:1")) if runtime is None else runtime,
        install_id=INSTALL,
        events=FakeBus(),
        policy=kw.pop("policy", FakePolicy()),
        sessions=sessions,
        identities=IdentityStore(str(run_dir)),
        agents=FakeAgents(),
        mounts=FakeMounts() if mounts is None else mounts,
        workspaces=fake_workspaces(run_dir),
    )
    service.check_engine()
    return service


def pool_containers(runtime: FakeRuntime) -> dict[str, dict]:
    return {cid: c for cid, c in runtime.containers.items() if c["labels"].get(LABEL_OWNER) == "pool"}


def test_the_pool_fills_with_hardened_workers_that_have_no_session_and_no_identity(run_dir, tmp_path):
    service = make_pool_service(run_dir, tmp_path)
    service.pool.refill()
    made = pool_containers(service.runtime)
    assert len(made) == 2 and all(c["state"] == "running" for c in made.values())
    for container_id, c in made.items():
        spec = c["spec"]
        assert spec.image == IMAGE and spec.command == ["baaaht-agent", "worker"]
        slot = c["labels"][LABEL_POOL_SLOT]
        [workspace] = [m for m in spec.mounts if m.target == WORKSPACE_TARGET]
        assert (workspace.source, workspace.propagation) == (str(run_dir / "pool" / slot), "rslave")
        assert (run_dir / "pool" / slot).is_dir()
        assert "baaaht.session" not in c["labels"] and c["labels"]["baaaht.agent_bus"] == "true"
        assert IdentityStore(str(run_dir)).get(container_id) is None
    assert service.pool.mounts.shared == {str(run_dir / "pool")}
    [(_, principal, *_)] = service.policy.seen[:1]
    assert principal.session_id == "" and principal.role == "worker"
    service.pool.refill()
    assert len(pool_containers(service.runtime)) == 2  # full: nothing more


def test_a_claim_gives_one_ready_container_to_the_session_and_the_pool_refills(run_dir, tmp_path):
    service = make_pool_service(run_dir, tmp_path)
    service.pool.refill()
    before = set(pool_containers(service.runtime))

    claimed = service.pool.claim("s1", "worker")

    assert claimed in before
    identity = IdentityStore(str(run_dir)).get(claimed)
    assert (identity.session_id, identity.role) == ("s1", "worker")
    assert claimed in [c.id for c in service.sessions.sessions["s1"].containers]
    slot = service.runtime.containers[claimed]["labels"][LABEL_POOL_SLOT]
    assert service.pool.mounts.table[str(run_dir / "pool" / slot)] == [service.workspaces.path("s1")]
    assert ("kill", claimed) in service.runtime.calls and service.runtime.signals[-1] == (claimed, "SIGURG")
    assert service.pool.claimed("s1", "worker") == [claimed] and service.pool.claimed("s2") == []
    service.pool.refill()
    states = {s.container_id: s.state for s in service.pool.status().slots}
    assert states[claimed] == "claimed"
    assert sorted(states.values()) == ["claimed", "ready", "ready"]


def test_no_container_is_ever_claimed_twice(run_dir, tmp_path):
    service = make_pool_service(run_dir, tmp_path, size=3)
    service.pool.refill()
    sessions = [f"s{i}" for i in range(6)]
    service.sessions.sessions = {s: session_info(s) for s in sessions}
    with concurrent.futures.ThreadPoolExecutor(6) as workers:
        claims = list(workers.map(lambda s: service.pool.claim(s, "worker"), sessions))
    given = [c for c in claims if c is not None]
    assert len(given) == 3 and len(set(given)) == 3
    assert {IdentityStore(str(run_dir)).get(c).session_id for c in given} == {
        s for s, c in zip(sessions, claims, strict=True) if c
    }
    service.pool.refill()
    assert service.pool.claim("s0", "worker") not in given  # a fresh one, never a served one


def test_the_pool_gives_nothing_it_should_not(run_dir, tmp_path):
    sessions = FakeSessions(
        session_info("s1"),
        session_info("tight", policy_override={"quotas": {"max_memory": 1}}),
        session_info("closing", state=SessionState.CLOSING),
    )
    service = make_pool_service(run_dir, tmp_path, sessions=sessions)
    assert service.pool.claim("s1", "worker") is None  # empty: a cold start
    service.pool.refill()
    assert service.pool.claim("s1", "assistant") is None  # not a pool role
    assert service.pool.claim("tight", "worker") is None  # judged by its own policy: a cold start
    assert service.pool.claim("closing", "worker") is None
    assert all(s.state == "ready" for s in service.pool.status().slots)


def test_a_claim_the_session_refuses_destroys_the_container(run_dir, tmp_path):
    sessions = FakeSessions(session_info("s1", max_containers=1))
    service = make_pool_service(run_dir, tmp_path, sessions=sessions)
    service.pool.refill()
    sessions.sessions["s1"].containers.append(SessionContainer(id="other", attached_at=0.0))
    ready = set(pool_containers(service.runtime))
    assert code_of(lambda: service.pool.claim("s1", "worker")) is ErrorCode.RESOURCE_EXHAUSTED
    assert len(ready - set(pool_containers(service.runtime))) == 1  # that one is gone, not returned
    assert not any(service.pool.mounts.table.values())
    assert list(IdentityStore(str(run_dir)).all()) == []


def test_a_failed_workspace_mount_removes_the_half_claimed_container(run_dir, tmp_path):
    service = make_pool_service(run_dir, tmp_path)
    service.pool.refill()
    service.pool.mounts.fail_bind = "mount: permission denied"
    failed = error_of(lambda: service.pool.claim("s1", "worker"))
    assert failed.code is ErrorCode.UNAVAILABLE and "permission denied" in failed.message
    assert len(pool_containers(service.runtime)) == 1
    assert list(IdentityStore(str(run_dir)).all()) == []


def test_a_dead_unclaimed_container_is_replaced_and_its_slot_removed(run_dir, tmp_path):
    service = make_pool_service(run_dir, tmp_path, size=1)
    service.pool.refill()
    [dead] = pool_containers(service.runtime)
    slot = service.runtime.containers[dead]["labels"][LABEL_POOL_SLOT]
    service.runtime.exit(dead, 1)
    service.pool.on_engine_event(engine_event("die", dead, service.runtime.containers[dead]["labels"]))
    service.pool.wait_for_work(0)  # woken: returns at once
    service.pool.refill()
    service.pool.monotonic = lambda: time.monotonic() + MAX_BACKOFF  # its backoff has passed
    service.pool.refill()
    [fresh] = pool_containers(service.runtime)
    assert fresh != dead and not (run_dir / "pool" / slot).exists()


def test_resize_is_the_operators_and_bounded_by_the_pool_quota(run_dir, tmp_path):
    service = make_pool_service(run_dir, tmp_path, size=2, most=3)
    service.pool.refill()
    denied = error_of(
        lambda: service.pool_resize(ContainerPoolResize(size=1), context(caller=service_caller("session")))
    )
    assert denied.code is ErrorCode.PERMISSION_DENIED  # not even a host service
    too_big = error_of(
        lambda: service.pool_resize(ContainerPoolResize(size=4), context(caller=operator_caller()))
    )
    assert too_big.code is ErrorCode.INVALID_ARGUMENT and "pool.max" in too_big.message
    assert service.pool_resize(ContainerPoolResize(size=3), context(caller=operator_caller())).size == 3
    service.pool.refill()
    assert len(pool_containers(service.runtime)) == 3
    service.pool_resize(ContainerPoolResize(size=1), context(caller=operator_caller()))
    service.pool.refill()
    status = service.pool_status(ContainerPoolStatus(), context(caller=operator_caller()))
    assert (status.size, status.max, [s.state for s in status.slots]) == (1, 3, ["ready"])
    assert len(os.listdir(run_dir / "pool")) == 1 + 1  # one slot and the claims directory


def test_unclaimed_pool_containers_count_against_the_pool_not_the_host(run_dir, tmp_path):
    service = make_pool_service(run_dir, tmp_path, size=2, max_containers=2)
    service.pool.refill()
    create(service, "s1")
    create(service, "s1")  # the host's two places are the sessions'
    claimed = service.pool.claim("s2", "worker")
    assert claimed is not None
    assert code_of(lambda: create(service, "s2")) is ErrorCode.RESOURCE_EXHAUSTED  # a claimed one counts


def test_after_a_crash_healthy_unclaimed_containers_are_kept_and_the_rest_removed(run_dir, tmp_path):
    runtime = FakeRuntime(images=(IMAGE,))
    mounts = FakeMounts()
    first = make_pool_service(run_dir, tmp_path, runtime, mounts, size=3)
    first.pool.refill()
    claimed = first.pool.claim("s1", "worker")
    kept, stopped = [c for c in pool_containers(runtime) if c != claimed][:2]
    runtime.exit(stopped, 137)
    runtime.add(  # half made: created, never started
        {**owner_labels(INSTALL, OwnerKind.POOL, role="worker"), LABEL_POOL_SLOT: "0123456789ab"}, "created"
    )
    stray_slot = run_dir / "pool" / "feedfacecafe"
    stray_slot.mkdir()
    # The container manager is killed here; a new one starts on the same engine and run directory.

    second = make_pool_service(run_dir, tmp_path, runtime, mounts, size=3)
    second.pool.refill()

    left = pool_containers(runtime)
    assert set(left) == {kept, claimed}
    second.pool.monotonic = lambda: time.monotonic() + MAX_BACKOFF  # the stopped one's backoff has passed
    second.pool.refill()
    assert len(pool_containers(runtime)) == 4  # the kept one, the claimed one and two new ones
    assert not stray_slot.exists()
    assert second.pool.claimed("s1", "worker") == [claimed]
    report = second.reconcile_now()
    assert report.removed == []  # pool containers are never orphans; the claimed one's session is open
    assert IdentityStore(str(run_dir)).get(claimed).session_id == "s1"  # settled as the session's


def test_a_claimed_container_follows_its_session_and_its_slot_goes_with_it(run_dir, tmp_path):
    service = make_pool_service(run_dir, tmp_path, size=1)
    service.pool.refill()
    claimed = service.pool.claim("s1", "worker")
    slot_dir = run_dir / "pool" / service.runtime.containers[claimed]["labels"][LABEL_POOL_SLOT]
    service.sessions.sessions["s1"] = session_info("s1", state=SessionState.CLOSED)

    report = service.reconcile_now()

    assert [r.id for r in report.removed] == [claimed]
    assert not slot_dir.exists() and not service.pool.mounts.is_mounted(str(slot_dir))
    assert IdentityStore(str(run_dir)).get(claimed) is None and service.pool.claimed("s1") == []


def test_destroying_a_claimed_container_releases_its_slot(run_dir, tmp_path):
    service = make_pool_service(run_dir, tmp_path, size=1)
    service.pool.refill()
    claimed = service.pool.claim("s1", "worker")
    slot_dir = run_dir / "pool" / service.runtime.containers[claimed]["labels"][LABEL_POOL_SLOT]
    service.destroy(ContainerDestroy(id=claimed, force=True), context(caller=operator_caller()))
    assert not slot_dir.exists() and service.pool.claimed("s1") == []


def test_containers_that_keep_dying_unclaimed_hold_the_refill_back(run_dir, tmp_path):
    service = make_pool_service(run_dir, tmp_path, size=1)
    service.pool.refill()
    [first] = pool_containers(service.runtime)
    service.runtime.exit(first, 2)
    service.pool.refill()
    assert pool_containers(service.runtime) == {}  # none started again at once
    assert "ended before a claim" in service.pool.status().problem
    service.pool.monotonic = lambda: time.monotonic() + MAX_BACKOFF  # the backoff has passed
    service.pool.refill()
    assert len(pool_containers(service.runtime)) == 1


def test_the_mount_table_is_read_with_its_escapes_and_propagation(tmp_path):
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "27 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw\n"
        "90 27 8:1 /run/pool /run/pool rw,relatime shared:41 - ext4 /dev/sda1 rw\n"
        "91 90 7:3 / /run/pool/a\\040b rw,nodev master:7 - ext4 /dev/loop3 rw\n"
    )
    assert mount_points(str(mountinfo)) == [
        ("/", ""),
        ("/run/pool", "shared:41"),
        ("/run/pool/a b", "master:7"),
    ]
    mounts = HostMounts(str(mountinfo))
    assert mounts.is_mounted("/run/pool/a b") and not mounts.is_mounted("/run/pool/a")


def test_a_claimed_container_is_listed_and_shown_as_its_sessions(run_dir, tmp_path):
    service = make_pool_service(run_dir, tmp_path, size=2)
    service.pool.refill()
    claimed = service.pool.claim("s1", "worker")
    ctx = context(caller=operator_caller())
    [listed] = service.list(ContainerList(session_id="s1"), ctx).containers
    assert (listed.id, listed.session_id, listed.role) == (claimed, "s1", "worker")
    assert [
        c.id for c in service.list(ContainerList(labels={LABEL_SESSION_AGENT: "worker"}), ctx).containers
    ] == [claimed]
    assert service.get(ContainerGet(id=claimed), ctx).session_id == "s1"
    assert len(service.list(ContainerList(), ctx).containers) == 2  # the ready one, with no session


def test_a_pool_directory_that_cannot_be_shared_starts_nothing_and_says_why(run_dir, tmp_path):
    mounts = FakeMounts()
    mounts.fail_share = "mount: permission denied"
    service = make_pool_service(run_dir, tmp_path, mounts=mounts)
    service.pool.refill()
    assert pool_containers(service.runtime) == {}
    assert "could not be made a shared mount: mount: permission denied" in service.pool.status().problem


def test_a_clean_stop_unmounts_the_pool_directory_when_no_pool_container_needs_it(run_dir, tmp_path):
    service = make_pool_service(run_dir, tmp_path, size=1)
    service.pool.refill()
    root = str(run_dir / "pool")
    service.pool.mounts.table[root] = [root]  # what share made (FakeMounts.share records only)
    service.on_stop()
    assert service.pool.mounts.is_mounted(root)  # its container runs on: a claim reaches it through it
    restarted = make_pool_service(run_dir, tmp_path, runtime=service.runtime, mounts=service.pool.mounts)
    restarted.pool.resize(0)
    restarted.pool.refill()
    assert pool_containers(restarted.runtime) == {}
    restarted.on_stop()
    assert not restarted.pool.mounts.is_mounted(root)


class WatchedEvent(threading.Event):
    """A wake-up event that tells when someone sleeps on it."""

    def __init__(self):
        super().__init__()
        self.slept_on = threading.Event()

    def wait(self, timeout=None) -> bool:
        self.slept_on.set()
        return super().wait(timeout)


@pytest.mark.parametrize("task, owner", [("keep_pool", "pool"), ("tend_session_agents", "session_agents")])
def test_stopping_wakes_an_upkeep_task_asleep_on_its_wake_up_event(
    run_dir, tmp_path, monkeypatch, task, owner
):
    # Sleeps far longer than the join below: only the stop can end them in time (they slept out their 5 s
    # and 1 s, and every container manager took 5 s to stop).
    monkeypatch.setattr(container_service, "POOL_CHECK_INTERVAL", 3600.0)
    monkeypatch.setattr(container_service, "TEND_WAIT_MAX", 3600.0)
    service = make_pool_service(run_dir, tmp_path)
    wake = getattr(service, owner).wake = WatchedEvent()
    stopping = Stopping()
    thread = threading.Thread(target=getattr(service, task), args=(stopping,), daemon=True)
    thread.start()
    assert wake.slept_on.wait(30), f"{task} never slept"
    stopping.set()
    thread.join(30)
    assert not thread.is_alive(), f"{task} slept on through the stop"
