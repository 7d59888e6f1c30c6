"""baaaht-ctl's bus commands, the real app: in-process (Typer's CliRunner) and as the installed script."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import pytest

from baaaht.ctl import bodies
from baaaht.ctl.common import iso_time
from baaaht.schemas.bus import BusPing
from baaaht.schemas.containers import ContainerCreate
from baaaht.schemas.sessions import SessionList
from tests import ctl_runner
from tests.services.echo import Emit, Shout


def test_ping_and_status_without_the_expected_services(echo):
    result = ctl_runner.run(echo, "ping")
    assert result.returncode == 0, result.stderr
    assert "broker pid" in result.stdout
    status = ctl_runner.run(echo, "status")
    assert status.returncode == 1  # only echo is there: scripts waiting on status keep waiting
    assert "echo" in status.stdout and "yes" in status.stdout
    assert "service container: no instance registered" in status.stderr
    assert "service policy: no instance registered" in status.stderr
    assert "service credential: no instance registered" in status.stderr
    data = json.loads(ctl_runner.run(echo, "status", "--json").stdout)
    assert data["healthy"] is False and data["services"][0]["name"] == "echo"
    assert "service session: no instance registered" in data["problems"]


def test_services_table_and_json_before_or_after_the_command(echo):
    table = ctl_runner.invoke(echo, "services").stdout.splitlines()
    assert table[0].split()[:3] == ["SERVICE", "INSTANCE", "PID"]
    assert table[1].split()[0] == "echo"
    before = json.loads(ctl_runner.invoke(echo, "--json", "services").stdout)
    after = json.loads(ctl_runner.invoke(echo, "services", "--json").stdout)
    assert "echo.say" in before[0]["instances"][0]["methods"]
    assert after[0]["name"] == before[0]["name"] == "echo"


def test_call_with_json_body(echo):
    result = ctl_runner.run(echo, "call", "echo.say", '{"text": "from ctl"}')
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["text"] == "from ctl"
    failed = ctl_runner.run(echo, "call", "echo.fail", '{"code": "NOT_FOUND"}')
    assert failed.returncode == 1
    assert failed.stderr.startswith("error NOT_FOUND: asked to fail")
    assert failed.stdout == ""
    bad = ctl_runner.run(echo, "call", "bus.events.replay", '{"since": "yesterday"}')
    assert bad.returncode == 1 and "invalid bus.events.replay" in bad.stderr and "$.since" in bad.stderr


def test_call_refuses_unknown_fields_unless_loose(echo):
    refused = ctl_runner.run(echo, "call", "session.list", '{"owner_id": "nobody"}')
    assert refused.returncode == 1 and refused.stdout == ""
    assert "invalid session.list: unknown field $.owner_id" in refused.stderr and "--loose" in refused.stderr
    nested = ctl_runner.run(
        echo,
        "call",
        "container.create",
        '{"session_id": "s", "spec": {"image": "x:1", "resources": {"nano_cpus": 1, "memory_bytes": 2}}}',
    )
    assert "unknown fields $.spec.resources.nano_cpus, $.spec.resources.memory_bytes" in nested.stderr
    loose = ctl_runner.run(
        echo, "call", "bus.events.replay", '{"since": 0, "limit": 1, "extra": 1}', "--loose"
    )
    assert loose.returncode == 0, loose.stderr
    assert "last_seq" in json.loads(loose.stdout)


@pytest.mark.parametrize(
    ("body", "schema", "unknown"),
    [
        ({"owner": "x", "labels": {"any": "thing"}}, SessionList, []),
        ({"owner_id": "x"}, SessionList, ["$.owner_id"]),
        (
            {"type": "container.create", "session_id": "s", "spec": {"image": "x", "mounts": [{"srcc": 1}]}},
            ContainerCreate,
            ["$.spec.mounts[0].srcc"],
        ),
        (
            {"session_id": "s", "spec": {"image": "x", "healthcheck": {"tests": []}}},
            ContainerCreate,
            ["$.spec.healthcheck.tests"],
        ),
        (
            {"session_id": "s", "spec": {"image": "x", "entrypoint": None, "env": {"A": "1"}}},
            ContainerCreate,
            [],
        ),
    ],
)
def test_unknown_fields_are_found_at_any_depth(body, schema, unknown):
    assert bodies.unknown_fields(body, schema) == unknown


def test_a_timeout_from_a_host_that_answers_is_a_timeout(echo):
    slow = ctl_runner.run(echo, "--timeout", "1", "call", "echo.say", '{"text": "x", "delay": 5}')
    assert slow.returncode == 1
    assert slow.stderr.startswith("error TIMEOUT: ") and "(timed out: --timeout 1s)" in slow.stderr
    assert "is baaaht-orchestrator running" not in slow.stderr


def test_events_header_json_lines_and_limit_counting_only_the_topic(echo):
    client = echo.service_client("echo")  # the operator may not publish: a service of echo's domain
    client.call(Emit(text="seen by ctl", times=2))  # echo.shouted.loud
    client.call(Emit(text="last", times=1))
    for _ in range(5):
        client.publish(Shout(text="other"), subtopic="quiet")  # newer, and of another topic
    client.call(BusPing())  # the broker has taken the events published before it
    loud = ["--topic", "echo.shouted.loud"]
    lines = ctl_runner.run(echo, "--json", "events", *loud, "--limit", "3").stdout.splitlines()
    events = [json.loads(line) for line in lines]
    assert [e["event"]["text"] for e in events] == ["seen by ctl", "seen by ctl", "last"]
    assert events[0]["time"].endswith("Z") and "T" in events[0]["time"]
    table = ctl_runner.invoke(echo, "events", *loud, "--limit", "1").stdout.splitlines()
    assert table[0].split() == ["SEQ", "TIME", "TOPIC", "SOURCE", "EVENT"]
    assert len(table) == 2 and '"last"' in table[1]
    assert ctl_runner.invoke(echo, "events", "--topic", "nothing.").stdout.splitlines() == ["(none)"]


def test_events_follow(echo):
    client = echo.client()
    client.call(Emit(text="before"))
    since = json.loads(ctl_runner.run(echo, "--json", "events", "--topic", "echo.").stdout.splitlines()[-1])[
        "seq"
    ]
    follower = ctl_runner.popen(echo, "--json", "events", "--follow", "--since", str(since - 1))
    try:
        first = json.loads(follower.stdout.readline())
        assert first["seq"] == since
        client.call(Emit(text="live"))
        while True:
            event = json.loads(follower.stdout.readline())
            if event["topic"].startswith("echo."):
                break
        assert event["event"]["text"] == "live"
    finally:
        follower.terminate()
        follower.communicate(timeout=15)


def test_schema_lists_wire_types_only(host):
    listing = ctl_runner.invoke(host, "schema").stdout.splitlines()
    rows = [line.split() for line in listing[1:]]
    assert ["bus.ping", "BusPing", "request"] in rows
    assert ["-", "CreateResult", "response"] in rows
    names = {row[1] for row in rows}
    assert not names & {"ContainerRef", "ContainerEvent"}  # bases, never sent themselves
    schema = json.loads(ctl_runner.invoke(host, "schema", "bus.events.replay").stdout)
    assert "since" in json.dumps(schema)
    unknown = ctl_runner.invoke(host, "schema", "nope.nothing", expect=1)
    assert "unknown schema type" in unknown.stderr


def test_both_clis_have_version():
    assert ctl_runner.invoke_app(["--version"], expect=0).stdout.startswith("baaaht-ctl 0.")
    orchestrator = str(Path(ctl_runner.CTL).with_name("baaaht-orchestrator"))
    shown = subprocess.run([orchestrator, "--version"], capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0 and shown.stdout.startswith("baaaht-orchestrator 0.")


def test_no_socket_fails_at_once_naming_it_and_how_to_point_elsewhere(tmp_path, monkeypatch):
    monkeypatch.delenv("BAAAHT_RUN_DIR", raising=False)
    run_dir = tmp_path / "no-host"
    started = time.monotonic()
    result = ctl_runner.invoke_app(["--run-dir", str(run_dir), "--timeout", "30", "ping"])
    assert time.monotonic() - started < 5  # not the 30 s timeout
    assert result.exit_code == 2 and result.stdout == ""
    assert f"no host at {run_dir}/bus.sock: the socket does not exist" in result.stderr
    assert "--run-dir DIR, BAAAHT_RUN_DIR or --config FILE" in result.stderr


def test_a_socket_nobody_listens_on_is_reported_as_no_host(tmp_path):
    run_dir = tmp_path / "dead-host"
    run_dir.mkdir()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(run_dir / "bus.sock"))  # the file of a host killed without cleaning up
    stale.close()
    result = ctl_runner.invoke_app(["--run-dir", str(run_dir), "--timeout", "1", "ping"])
    assert result.exit_code == 2 and result.stdout == ""
    assert f"the host at {run_dir}/bus.sock does not answer" in result.stderr
    assert "is baaaht-orchestrator running?" in result.stderr


def test_one_time_format():
    assert iso_time(1796115600.75) == "2026-12-01T09:00:00Z"
    assert iso_time("2026-12-01T09:00:00.123456789Z") == "2026-12-01T09:00:00Z"
    assert iso_time("2026-12-01T10:00:00.5+01:00") == "2026-12-01T09:00:00Z"
    assert iso_time("0001-01-01T00:00:00Z") is None and iso_time(0.0) is None
