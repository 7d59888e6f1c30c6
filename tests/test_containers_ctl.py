"""`baaaht-ctl containers ...` against a real host (broker, policy, sessions, containers, engine)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from baaaht.ctl import containers
from baaaht.ctl.common import state
from baaaht.schemas.containers import ContainerStart, ContainerWait
from tests import container_support
from tests.harness import wait_for
from tests.test_containers_bus import SETTINGS, Orchestrator

pytestmark = pytest.mark.docker

docker_client, busybox = container_support.docker_client, container_support.busybox

ctl = typer.Typer()
ctl.add_typer(containers.app, name="containers")


@pytest.fixture
def orchestrator(make_host, docker_client, busybox, monkeypatch):
    made = Orchestrator(make_host(SETTINGS), docker_client)
    monkeypatch.setattr(state, "config_path", str(made.host.config_path))
    monkeypatch.setattr(state, "_config", None)
    monkeypatch.setattr(state, "_client", None)
    yield made
    state.close()
    made.cleanup()


def run(monkeypatch, *args: str, as_json: bool = False):
    monkeypatch.setattr(state, "json", as_json)
    return CliRunner().invoke(ctl, ["containers", *args])


def test_list_get_logs_stats_stop_rm(orchestrator, busybox, monkeypatch):
    session = orchestrator.session()
    finished = orchestrator.create(session, busybox, "echo out; echo err >&2")
    orchestrator.bus.call(ContainerStart(id=finished))
    orchestrator.bus.call(ContainerWait(id=finished))
    running = orchestrator.create(session, busybox, "sleep 600")
    orchestrator.bus.call(ContainerStart(id=running))

    listed = run(monkeypatch, "list", "--session", session, as_json=True)
    assert listed.exit_code == 0, listed.output
    assert {c["id"] for c in json.loads(listed.stdout)} == {finished, running}
    table = run(monkeypatch, "list", "--state", "running")
    assert table.exit_code == 0 and running[:12] in table.stdout and finished[:12] not in table.stdout
    assert table.stdout.splitlines()[0].split()[:3] == ["ID", "NAME", "STATE"]

    got = run(monkeypatch, "get", finished[:12], as_json=True)
    assert json.loads(got.stdout)["exit_code"] == 0

    logs = run(monkeypatch, "logs", finished)
    assert logs.exit_code == 0 and logs.stdout == "out\n" and logs.stderr == "err\n"

    sample = run(monkeypatch, "stats", running, as_json=True)
    assert sample.exit_code == 0, sample.output
    assert json.loads(sample.stdout)["pids"] >= 1

    assert run(monkeypatch, "stop", running, "--timeout", "5").exit_code == 0
    assert run(monkeypatch, "rm", running).exit_code == 0
    missing = run(monkeypatch, "get", running)
    assert missing.exit_code == 1 and "NOT_FOUND" in missing.stderr
    bad = run(monkeypatch, "list", "--label", "no-equals-sign")
    assert bad.exit_code == 1 and "KEY=VALUE" in bad.stderr


def test_logs_follow_ends_cleanly_on_ctrl_c(orchestrator, busybox):
    container = orchestrator.create(orchestrator.session(), busybox, "echo first; sleep 600")
    orchestrator.bus.call(ContainerStart(id=container))
    code = (
        "import sys; from baaaht.ctl.common import state; from baaaht.ctl import containers; "
        "state.config_path = sys.argv[1]; containers.app(['logs', '-f', sys.argv[2]])"
    )
    follower = subprocess.Popen(
        [sys.executable, "-c", code, str(orchestrator.host.config_path), container],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_for(lambda: follower.stdout.readline(), what="the first followed line") == "first\n"
        follower.send_signal(signal.SIGINT)
        _out, err = follower.communicate(timeout=15)
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait(5)
    assert follower.returncode == 0 and "interrupted" in err and "Traceback" not in err
