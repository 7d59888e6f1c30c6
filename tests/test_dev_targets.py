"""The development targets' promises: unit files stay within the unit boundary, the tree passes lint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

CONFTEST = "from tests.conftest import pytest_collection_modifyitems, unit_boundary  # noqa: F401\n"


def test_a_unit_file_that_starts_a_process_fails_even_when_the_code_swallows_the_error(pytester):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        test_logs="""
import subprocess

def test_spawns():
    try:
        subprocess.run(["true"])
    except Exception:
        pass
"""
    )
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*a unit test crossed the unit boundary: start a process*"])


def test_a_unit_file_that_creates_a_docker_client_fails(pytester):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_logs="import docker\n\ndef test_engine():\n    docker.from_env()\n")
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1, errors=1)
    result.stdout.fnmatch_lines(["*a unit test tried to talk to the Docker engine*"])


def test_a_file_not_listed_as_unit_is_an_integration_test_and_may_start_processes(pytester):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        test_new="import subprocess\n\ndef test_spawns():\n    subprocess.run(['true'], check=True)\n"
    )
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-m", "integration")
    result.assert_outcomes(passed=1)


def test_a_handler_a_test_set_up_on_its_captured_stream_is_gone_before_the_next_test(pytester):
    pytester.makeconftest("from tests.conftest import logging_put_back  # noqa: F401\n")
    pytester.makepyfile(
        test_later="""
import logging
from baaaht.common.logs import setup_logging
from baaaht.schemas.config import LogConfig

def test_sets_up_logging_on_captured_stderr(capsys):
    setup_logging(LogConfig(), "test")

def test_a_later_test_logs_into_no_closed_stream():
    streams = [getattr(h, "stream", None) for h in logging.getLogger().handlers]
    assert not [s for s in streams if getattr(s, "closed", False)]
"""
    )
    pytester.runpytest_inprocess("-p", "no:cacheprovider").assert_outcomes(passed=2)


@pytest.mark.parametrize("command", [["check", "."], ["format", "--check", "."]])
def test_the_tree_passes_make_lint(command):
    pytest.importorskip("ruff", reason="ruff is in the test extra: pip install -e '.[test]'")
    result = subprocess.run(
        [sys.executable, "-m", "ruff", *command], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
