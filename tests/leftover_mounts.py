"""A pytest plugin that fails a test module leaving a mount or a loop device behind in its own directories:
pytest's base temporary directory of this run, and the run directories this process made with
`short_run_dir` (`/tmp/<prefix><pid>-…`). Checked once the module's last test and its module fixtures are
torn down (a module may share a host across its tests); what is found is reported as that test's teardown
error, then taken down, so that the next module starts clean. Mounts of other runs on the machine are not
this run's to judge: they are never looked at."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from baaaht.common.mounts import mount_points, unmount_beneath

LOOP_DEVICES = Path("/sys/block")
# A loop device outlives its lazy unmount until the last user of its filesystem lets go: a short grace.
LOOP_RELEASE = 10.0


def own_run_dir_prefix() -> re.Pattern:
    return re.compile(rf"^/tmp/[a-z]+-{os.getpid()}-[^/]+")


class OwnDirectories:
    def __init__(self, basetemp: Path):
        self.basetemp = str(basetemp)
        self.run_dirs = own_run_dir_prefix()

    def holds(self, path: str) -> bool:
        return (
            path == self.basetemp or path.startswith(self.basetemp + "/") or bool(self.run_dirs.match(path))
        )

    def mounts(self) -> set[str]:
        return {point for point, _ in mount_points() if self.holds(point)}

    def loop_devices(self) -> dict[str, str]:
        """Loop device -> its backing file, for files in these directories (`(deleted)` once removed)."""
        found = {}
        for backing in LOOP_DEVICES.glob("loop*/loop/backing_file"):
            try:
                path = backing.read_text().strip().removesuffix(" (deleted)")
            except OSError:
                continue  # detached while we looked
            if self.holds(path):
                found[f"/dev/{backing.parent.parent.name}"] = path
        return found

    def top_of(self, path: str) -> str:
        match = self.run_dirs.match(path)
        return match.group(0) if match else self.basetemp


@pytest.fixture(scope="session")
def own_directories(tmp_path_factory) -> OwnDirectories:
    return OwnDirectories(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module", autouse=True)
def no_mount_left_behind(request, own_directories):
    """Autouse and module-scoped: set up before the module's other module fixtures, torn down after them."""
    mounts_before = own_directories.mounts()
    loops_before = own_directories.loop_devices().keys()
    yield
    left = own_directories.mounts() - mounts_before
    loops = {d: f for d, f in own_directories.loop_devices().items() if d not in loops_before}
    deadline = time.monotonic() + LOOP_RELEASE
    while loops and not left and time.monotonic() < deadline:  # unmounted, its last user still letting go
        time.sleep(0.1)
        loops = {d: f for d, f in own_directories.loop_devices().items() if d not in loops_before}
    if not left and not loops:
        return
    for point in left:
        unmount_beneath(own_directories.top_of(point))
    for device in loops:
        subprocess.run(["losetup", "--detach", device], capture_output=True, timeout=30)
    described = [f"mount {point}" for point in sorted(left)]
    described += [f"loop device {device} of {file}" for device, file in sorted(loops.items())]
    pytest.fail(
        f"{request.node.name} left behind in its own directories: {'; '.join(described)}"
        " (each test or fixture unmounts what it or its host mounted)",
        pytrace=False,
    )
