"""`baaaht-ctl containers ...` and `status` against a real host (broker, policy, sessions, containers,
engine), through the real baaaht-ctl app."""

from __future__ import annotations

import json
import signal

import pytest

from baaaht.bus.testing import code_of, next_event
from baaaht.schemas.containers import ContainerGet, ContainerStart, ContainerWait
from baaaht.schemas.errors import ErrorCode
from tests import container_support, ctl_runner
from tests.test_containers_bus import SETTINGS, Orchestrator

pytestmark = pytest.mark.docker

docker_client, busybox = container_support.docker_client, container_support.busybox


@pytest.fixture
def orchestrator(make_host, docker_client, busybox):
    made = Orchestrator(make_host(SETTINGS), docker_client)
    yield made
    made.cleanup()


@pytest.fixture
def ctl(orchestrator):
    def invoke(*args: str, expect: int | None = 0):
        return ctl_runner.invoke(orchestrator.host, "containers", *args, expect=expect)

    return invoke


def test_status_is_healthy_with_every_expected_service(orchestrator):
    orchestrator.host.start_service("baaaht.services.credentials", service="credential")
    orchestrator.host.start_service("baaaht.services.scheduler", "scheduler", service="task")
    status = ctl_runner.run(orchestrator.host, "status")
    assert status.returncode == 0, status.stderr
    listed = {line.split()[0] for line in status.stdout.splitlines()[2:]}
    assert {"container", "session", "policy", "credential", "task"} <= listed


def test_list_get_logs_stats_stop_rm(orchestrator, busybox, ctl):
    session = orchestrator.session()
    finished = orchestrator.create(session, busybox, "echo out; echo err >&2")
    orchestrator.bus.call(ContainerStart(id=finished))
    orchestrator.bus.call(ContainerWait(id=finished))
    running = orchestrator.create(session, busybox, "sleep 600")
    orchestrator.bus.call(ContainerStart(id=running))

    listed = ctl("list", "--session", session, "--json")
    assert {c["id"] for c in json.loads(listed.stdout)} == {finished, running}
    assert all(c["created"].endswith("Z") for c in json.loads(listed.stdout))
    table = ctl("list", "--state", "running")
    assert running[:12] in table.stdout and finished[:12] not in table.stdout
    assert table.stdout.splitlines()[0].split()[:3] == ["ID", "NAME", "STATE"]

    got = json.loads(ctl("get", finished[:12], "--json").stdout)
    assert got["exit_code"] == 0
    assert got["finished_at"].endswith("Z") and len(got["finished_at"]) == len("2026-12-01T09:00:00Z")

    logs = ctl("logs", finished)
    assert logs.stdout == "out\n" and logs.stderr == "err\n"
    lines = [json.loads(line) for line in ctl("logs", finished, "--json").stdout.splitlines()]
    assert sorted((line["stream"], line["text"]) for line in lines) == [("stderr", "err"), ("stdout", "out")]

    sample = ctl("stats", running, "--json")
    assert json.loads(sample.stdout)["pids"] >= 1
    refused = ctl("stats", running, "--stream", "--interval", "0.5", expect=1)
    assert "`$.interval`" in refused.stderr and ">= 1" in refused.stderr

    assert json.loads(ctl("stop", running, "--timeout", "5", "--json").stdout) == {
        "id": running,
        "stopped": True,
    }
    assert json.loads(ctl("rm", running, "--json").stdout) == {"id": running, "removed": True}
    missing = ctl("get", running, expect=1)
    assert "NOT_FOUND" in missing.stderr
    bad = ctl("list", "--label", "no-equals-sign", expect=1)
    assert "KEY=VALUE" in bad.stderr


def test_run_in_the_foreground_prints_output_and_exits_with_its_code(orchestrator, busybox, ctl):
    session = orchestrator.session()
    ran = ctl(
        "run", "--session", session, "--rm", "-e", "WHO=world", "--memory", "64MB", "--cpus", "0.5",
        "--label", "purpose=test", busybox, "--", "sh", "-c", 'echo "hello $WHO"; exit 3',
        expect=3,
    )  # fmt: skip
    assert ran.stdout == "hello world\n"
    assert orchestrator.on_engine(session) == []  # --rm removed it


def test_create_start_restart_exec_kill_wait(orchestrator, busybox, ctl):
    session = orchestrator.session()
    container = ctl("create", "-s", session, "--name", f"made-{session[:8]}", busybox, "--", "sleep", "600")
    container = container.stdout.strip()
    assert orchestrator.bus.call(ContainerGet(id=container)).state == "created"
    assert json.loads(ctl("start", container, "--json").stdout) == {"id": container, "started": True}
    assert ctl("restart", container, "-t", "1").stderr == f"restarted {container}\n"

    done = ctl("exec", container, "--", "sh", "-c", "id -u; echo oops >&2; exit 4", expect=4)
    assert done.stdout == "1000\n" and done.stderr == "oops\n"  # as the container's own user
    result = json.loads(ctl("exec", "-e", "X=1", container, "--json", "--", "sh", "-c", "echo $X").stdout)
    assert (result["exit_code"], result["stdout"]) == (0, "1\n")
    assert "command must name a program" in ctl("exec", container, "--", "", expect=1).stderr

    assert json.loads(ctl("kill", container, "--json").stdout)["killed"] is True
    assert ctl("wait", container).stdout == "137\n"
    stopped = ctl("exec", container, "--", "true", expect=1)
    assert "error" in stopped.stderr


def test_run_detached_with_rm_is_removed_by_the_engine_when_it_ends(orchestrator, busybox, ctl):
    session = orchestrator.session()
    container = ctl("run", "-d", "--rm", "-s", session, busybox, "--", "sleep", "600").stdout.strip()
    assert orchestrator.bus.call(ContainerGet(id=container)).state == "running"
    with orchestrator.bus.subscribe(["container.removed"]) as removals:
        ctl("kill", container)
        next_event(removals, lambda d: d.event.container_id == container, what="the container's removal")
    assert orchestrator.on_engine(session) == []
    assert code_of(lambda: orchestrator.bus.call(ContainerGet(id=container))) is ErrorCode.NOT_FOUND


def test_logs_follow_ends_cleanly_on_ctrl_c(orchestrator, busybox):
    container = orchestrator.create(orchestrator.session(), busybox, "echo first; sleep 600")
    orchestrator.bus.call(ContainerStart(id=container))
    follower = ctl_runner.popen(orchestrator.host, "containers", "logs", "-f", container)
    try:
        assert ctl_runner.line_reader(follower, "the first followed line")() == "first\n"
        follower.send_signal(signal.SIGINT)
        err = ctl_runner.stderr_once_ended(follower)
    finally:
        ctl_runner.reap(follower)
    assert follower.returncode == 0 and "interrupted" in err and "Traceback" not in err
