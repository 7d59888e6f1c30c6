"""scripts/ensure-docker.sh against stand-in commands: what it installs, whatever the engine does."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "ensure-docker.sh"


def stub(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


@pytest.fixture
def stand_ins(tmp_path):
    """A PATH where `docker info` answers, dockerd exists, dpkg knows only what `installed` lists,
    and apt-get and sudo record what they were asked to do."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    installed = tmp_path / "installed"
    installed.write_text("")
    stub(bin_dir, "docker", "exit 0")
    stub(bin_dir, "dockerd", "exit 0")
    stub(
        bin_dir,
        "dpkg-query",
        f'for last; do :; done; grep -qx "$last" {installed} && printf "install ok installed"; exit 0',
    )
    stub(bin_dir, "apt-get", f'echo "apt-get $*" >> {calls}')
    stub(bin_dir, "sudo", '[ "$1" = -n ] && shift; exec "$@"')
    return bin_dir, calls, installed


def run_script(bin_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin"}
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)


def test_packages_the_tests_need_are_installed_when_the_engine_already_answers(stand_ins):
    bin_dir, calls, _ = stand_ins
    result = run_script(bin_dir)
    assert result.returncode == 0, result.stderr
    [install] = [line for line in calls.read_text().splitlines() if " install " in line]
    assert install.split()[-2:] == ["debootstrap", "busybox-static"]  # not docker.io: dockerd is there


def test_nothing_is_installed_when_everything_is_there(stand_ins):
    bin_dir, calls, installed = stand_ins
    installed.write_text("debootstrap\nbusybox-static\n")
    result = run_script(bin_dir)
    assert result.returncode == 0, result.stderr
    assert not calls.exists()
