"""Workspaces on real loop mounts: ext4 images of a fixed size, owned by the agent user, mounted
nodev,nosuid, mounted again after the mounts are gone, removed with their loop devices."""

from __future__ import annotations

import errno
import os
import subprocess

import pytest

from baaaht.bus.testing import wait_for
from baaaht.services.containers.workspaces import AGENT_UID, LoopMounts, WorkspaceError, Workspaces

SIZE = 32 * 1024 * 1024

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/loop-control"), reason="loop mounts need root"
)


def mount_options() -> dict[str, str]:
    """target -> options of every mount of this process's namespace."""
    with open("/proc/self/mounts") as mounts:
        return {line.split()[1]: line.split()[3] for line in mounts}


def mounted_below(directory: str) -> list[str]:
    return [target for target in mount_options() if target.startswith(directory.rstrip("/") + "/")]


def loop_devices_of(directory: str) -> list[str]:
    listing = subprocess.run(["losetup", "-a"], capture_output=True, text=True, timeout=10).stdout
    return [line for line in listing.splitlines() if directory in line]


def wait_loop_devices_freed(directory: str, keep: int = 0) -> None:
    """Until `keep` loop devices hold images below `directory` (the kernel frees an autoclear device
    after its last unmount, asynchronously)."""
    wait_for(lambda: len(loop_devices_of(directory)) == keep, 10, what=f"loop devices of {directory} freed")


@pytest.fixture
def workspaces(tmp_path):
    made = Workspaces(str(tmp_path), SIZE, LoopMounts())
    yield made
    for target in mounted_below(str(tmp_path)):
        subprocess.run(["umount", target], timeout=30, check=False)
    wait_loop_devices_freed(str(tmp_path))


def test_a_workspace_is_an_ext4_mount_of_its_image_owned_by_the_agent_user(workspaces, tmp_path):
    path = workspaces.ensure("s1")
    assert os.path.ismount(path) and workspaces.path("s1") == path
    info = os.stat(path)
    assert (info.st_uid, info.st_gid) == (AGENT_UID, AGENT_UID)
    assert os.listdir(path) == []
    assert {"nodev", "nosuid", "rw"} <= set(mount_options()[path].split(","))
    image = workspaces.image_of("s1")
    assert os.stat(image).st_size == SIZE
    assert os.stat(image).st_blocks * 512 < SIZE // 2  # sparse


def test_writing_past_the_size_is_enospc_and_the_workspace_stays_usable(workspaces):
    path = workspaces.ensure("s1")
    chunk = b"x" * (1024 * 1024)
    with pytest.raises(OSError) as raised:
        with open(os.path.join(path, "big"), "wb") as file:
            for _ in range(2 * SIZE // len(chunk)):
                file.write(chunk)
                file.flush()
            os.fsync(file.fileno())
    assert raised.value.errno == errno.ENOSPC
    os.unlink(os.path.join(path, "big"))
    with open(os.path.join(path, "small"), "wb") as file:
        file.write(b"fits")
    with open(os.path.join(path, "small"), "rb") as file:
        assert file.read() == b"fits"


def test_two_sessions_have_separate_filesystems(workspaces):
    a, b = workspaces.ensure("a"), workspaces.ensure("b")
    assert os.stat(a).st_dev != os.stat(b).st_dev
    with open(os.path.join(a, "note"), "w") as file:
        file.write("a")
    assert os.listdir(b) == []


def test_mounted_again_with_its_files_after_the_mounts_are_gone(workspaces, tmp_path):
    path = workspaces.ensure("s1")
    with open(os.path.join(path, "note"), "w") as file:
        file.write("survives")
    subprocess.run(["umount", path], timeout=30, check=True)  # what a host restart does
    assert workspaces.path("s1") is None
    again = Workspaces(str(tmp_path), SIZE, LoopMounts())
    assert again.mount_existing() == []
    with open(os.path.join(again.path("s1"), "note")) as file:
        assert file.read() == "survives"


def test_remove_unmounts_frees_the_loop_device_and_deletes_the_image(workspaces, tmp_path):
    path = workspaces.ensure("s1")
    assert len(loop_devices_of(str(tmp_path))) == 1
    workspaces.remove("s1")
    assert not os.path.exists(path) and not os.path.exists(workspaces.image_of("s1"))
    assert mounted_below(str(tmp_path)) == []
    wait_loop_devices_freed(str(tmp_path))


def test_a_damaged_image_is_refused_naming_its_file(workspaces):
    path = workspaces.ensure("s1")
    subprocess.run(["umount", path], timeout=30, check=True)
    image = workspaces.image_of("s1")
    with open(image, "r+b") as file:
        file.seek(1024)  # the ext4 superblock
        file.write(b"\0" * 1024)
    with pytest.raises(WorkspaceError) as raised:
        workspaces.ensure("s1")
    assert image in raised.value.message
    assert workspaces.path("s1") is None and os.stat(image).st_size == SIZE


def test_an_image_still_in_use_elsewhere_is_never_mounted_a_second_time(workspaces):
    path = workspaces.ensure("s1")
    elsewhere = os.path.join(os.path.dirname(path), "elsewhere")
    os.mkdir(elsewhere)
    subprocess.run(["mount", "--bind", path, elsewhere], timeout=30, check=True)  # e.g. a pool slot
    subprocess.run(["umount", path], timeout=30, check=True)
    with pytest.raises(WorkspaceError) as raised:
        workspaces.ensure("s1")
    assert (
        "is in use (/dev/loop" in raised.value.message and workspaces.image_of("s1") in raised.value.message
    )
    assert workspaces.path("s1") is None


def test_no_image_is_made_without_room_for_every_image_to_fill(tmp_path):
    """Images are sparse: two 64 MiB workspaces on a 100 MiB filesystem let session A's fill take the
    space session B's filesystem still shows free, and B's writes fail with I/O errors (kernel: 'potential
    data loss'). The second image is refused instead, and the first fills to its own limit."""
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=100m", "review-room", str(small)], check=True, timeout=30
    )
    try:
        workspaces = Workspaces(str(small), 64 * 1024 * 1024, LoopMounts())
        first = workspaces.ensure("s1")
        refused = pytest.raises(WorkspaceError, workspaces.ensure, "s2")
        assert "no room for the workspace image" in refused.value.message
        assert os.listdir(workspaces.images_dir) == [os.path.basename(workspaces.image_of("s1"))]
        with pytest.raises(OSError) as full:
            with open(os.path.join(first, "big"), "wb") as file:
                while True:
                    file.write(b"x" * (1024 * 1024))
                    file.flush()
                    os.fsync(file.fileno())
        assert full.value.errno == errno.ENOSPC  # its own limit, not the host's
        workspaces.remove("s1")
    finally:
        for target in mounted_below(str(small)):
            subprocess.run(["umount", target], timeout=30, check=False)
        wait_loop_devices_freed(str(small))
        subprocess.run(["umount", str(small)], timeout=30, check=False)
