"""The warm pool's way of delivering a workspace to a running container, on the real engine and the host's
real mount table: a pooled container started before its session existed sees, after the claim, the files
written into the session's workspace on the host beforehand; releasing it unmounts and removes its slot."""

from __future__ import annotations

import uuid

import pytest

from baaaht.common.identity import IdentityStore
from baaaht.common.mounts import mount_points, unmount_beneath
from baaaht.schemas.config import Config, PoolConfig
from baaaht.schemas.containers import ContainerSpec, Mount
from baaaht.services.containers.docker_runtime import DockerRuntime
from baaaht.services.containers.hardening import Identity, attach_identity
from baaaht.services.containers.identities import Identities
from baaaht.services.containers.ownership import LABEL_INSTALL, OwnerKind
from baaaht.services.containers.pool import LABEL_POOL_SLOT, WORKSPACE_TARGET, HostMounts, Pool
from tests import container_support
from tests.container_fakes import FakeAgents, FakeSessions, session_info
from tests.test_containers_pool import make_pool_service

pytestmark = pytest.mark.docker

docker_client, busybox = container_support.docker_client, container_support.busybox


@pytest.fixture
def engine(docker_client):
    runtime = DockerRuntime(Config())
    install = uuid.uuid4().hex
    yield runtime, install
    container_support.remove_labelled(docker_client, f"{LABEL_INSTALL}={install}")
    runtime.close()


def test_a_claim_mounts_the_workspace_into_the_running_container(engine, busybox, docker_client, tmp_path):
    runtime, install = engine
    run_dir = tmp_path / "run"

    def busybox_spec(slot_dir: str, live: int) -> ContainerSpec:
        slot = Mount(type="bind", source=slot_dir, target=WORKSPACE_TARGET, propagation="rslave")
        spec = ContainerSpec(image=busybox, command=["sleep", "600"], mounts=[slot], network_mode="none")
        return attach_identity(spec, Identity(install, "", "worker", OwnerKind.POOL), None)

    sessions = FakeSessions(session_info("s1"))
    pool = Pool(
        PoolConfig(size=1, max=1),
        run_dir=str(run_dir),
        install_id=install,
        runtime=runtime,
        mounts=HostMounts(),
        identities=Identities(IdentityStore(str(run_dir)), install, FakeAgents()),
        sessions=sessions,
        build_spec=busybox_spec,
        workspace_of=lambda session: str(tmp_path / "workspaces" / session),
    )
    try:
        pool.refill()
        [member] = pool.members()
        assert member.state == "running"  # started before the session's files exist
        workspace = tmp_path / "workspaces" / "s1"
        workspace.mkdir(parents=True)
        (workspace / "notes.txt").write_text("written before the claim\n")

        claimed = pool.claim("s1", "worker")

        assert claimed == member.id
        seen = docker_client.containers.get(claimed).exec_run(["cat", f"{WORKSPACE_TARGET}/notes.txt"])
        assert (seen.exit_code, seen.output) == (0, b"written before the claim\n")
        written = docker_client.containers.get(claimed).exec_run(
            ["sh", "-c", "echo back > /workspace/back.txt"]
        )
        assert written.exit_code == 0 and (workspace / "back.txt").read_text() == "back\n"
        slot_dir = run_dir / "pool" / member.labels[LABEL_POOL_SLOT]
        assert HostMounts().is_mounted(str(slot_dir))

        pool.discard(claimed, "the test is done")

        assert not slot_dir.exists() and not HostMounts().is_mounted(str(slot_dir))
        assert (workspace / "notes.txt").exists()  # the session's files stay where they are
    finally:
        unmount_beneath(str(run_dir))


def test_the_pool_directory_is_mounted_once_across_a_crash_and_unmounted_on_a_clean_stop(tmp_path):
    """On the host's real mount table (root): a start shares it, a start after a crash (the mount still
    there) stacks nothing on it, a clean stop with no pool container left takes it back."""
    run_dir = tmp_path / "run"
    (run_dir / "agent").mkdir(parents=True)
    root = str(run_dir / "pool")

    def mounts_at_root() -> int:
        return sum(point == root for point, _ in mount_points())

    try:
        crashed = make_pool_service(run_dir, tmp_path, mounts=HostMounts(), size=0)
        crashed.pool.refill()
        assert mounts_at_root() == 1
        restarted = make_pool_service(run_dir, tmp_path, mounts=HostMounts(), size=0)
        restarted.pool.refill()
        assert mounts_at_root() == 1
        restarted.on_stop()
        assert mounts_at_root() == 0
    finally:
        unmount_beneath(str(run_dir))
