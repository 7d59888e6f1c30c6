"""The suite's check for mounts and loop devices left behind (tests/leftover_mounts.py), on made-up test
modules run by pytest in this process: what they leave fails the module and is taken down."""

from __future__ import annotations

import subprocess

import pytest

from baaaht.common.mounts import mount_points, unmount_beneath
from tests import leftover_mounts

PLUGIN = ["-p", "tests.leftover_mounts", "-p", "no:cacheprovider"]

TMPFS = """
import subprocess

from baaaht.bus.testing import short_run_dir


def tmpfs(path):
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "leftover-check", str(path)], check=True)
"""


@pytest.fixture
def run(pytester):
    """Runs the made-up module; afterwards nothing of it may be mounted (the check took it down)."""

    def run_module(source: str):
        pytester.makepyfile(test_made_up=TMPFS + source)
        result = pytester.runpytest_inprocess(*PLUGIN)
        assert [
            p for p, _ in mount_points() if "leftover-check" in p or p.startswith(str(pytester.path))
        ] == []
        return result

    yield run_module
    unmount_beneath(str(pytester.path))


def test_a_mount_left_in_a_tests_tmp_path_fails_the_module(run):
    result = run(
        "def test_leaves_a_mount(tmp_path):\n    tmpfs(tmp_path / 'mnt')\n\n"
        "def test_the_last_of_the_module():\n    pass\n"
    )
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        ["*test_made_up.py left behind in its own directories: mount */test_leaves_a_mount0/mnt*"]
    )


def test_a_mount_left_in_a_run_directory_fails_the_module(run):
    result = run(
        "import pathlib\n\ndef test_leaves_a_mount():\n"
        "    tmpfs(pathlib.Path(short_run_dir('bt-')) / 'pool')\n"
    )
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*left behind in its own directories: mount /tmp/bt-*/pool*"])


def test_a_loop_device_left_attached_fails_the_module(run, pytester, monkeypatch):
    monkeypatch.setattr(leftover_mounts, "LOOP_RELEASE", 0.5)  # the grace for one that is let go of
    result = run(
        "def test_leaves_a_loop_device(tmp_path):\n"
        "    (tmp_path / 'image').write_bytes(bytes(1 << 20))\n"
        "    subprocess.run(['losetup', '--find', str(tmp_path / 'image')], check=True)\n"
    )
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*left behind in its own directories: loop device /dev/loop* of */image*"])
    listing = subprocess.run(["losetup", "-a"], capture_output=True, text=True, timeout=10).stdout
    assert str(pytester.path) not in listing  # detached


def test_mounts_taken_down_by_their_fixtures_pass_even_when_shared_by_the_module(run):
    result = run(
        "import pytest\n\n"
        "@pytest.fixture(scope='module')\n"
        "def shared(tmp_path_factory):\n"
        "    path = tmp_path_factory.mktemp('shared')\n"
        "    tmpfs(path)\n"
        "    yield path\n"
        "    subprocess.run(['umount', str(path)], check=True)\n\n"
        "def test_one(shared, tmp_path):\n"
        "    tmpfs(tmp_path / 'own')\n"
        "    subprocess.run(['umount', str(tmp_path / 'own')], check=True)\n\n"
        "def test_two(shared):\n    pass\n"
    )
    result.assert_outcomes(passed=2)
