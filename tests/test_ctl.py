"""baaaht-ctl's bus commands, run as the installed console script against a live host."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from tests.services.echo import Emit

CTL = str(Path(sys.executable).parent / "baaaht-ctl")


def ctl(host, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CTL, "--config", str(host.config_path), *args], capture_output=True, text=True, timeout=timeout
    )


def test_ping_and_status(echo):
    result = ctl(echo, "ping")
    assert result.returncode == 0, result.stderr
    assert "broker pid" in result.stdout
    status = ctl(echo, "status")
    assert status.returncode == 0, status.stderr
    assert "echo" in status.stdout and "yes" in status.stdout
    data = json.loads(ctl(echo, "status", "--json").stdout)
    assert data["healthy"] is True
    assert data["services"][0]["name"] == "echo"


def test_services_table_and_json(echo):
    table = ctl(echo, "services").stdout.splitlines()
    assert table[0].split()[:3] == ["SERVICE", "INSTANCE", "PID"]
    assert table[1].split()[0] == "echo"
    listed = json.loads(ctl(echo, "--json", "services").stdout)
    assert "echo.say" in listed[0]["instances"][0]["methods"]


def test_call_with_json_body(echo):
    result = ctl(echo, "call", "echo.say", '{"text": "from ctl"}')
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["text"] == "from ctl"
    failed = ctl(echo, "call", "echo.fail", '{"code": "NOT_FOUND"}')
    assert failed.returncode == 1
    assert failed.stderr.startswith("error NOT_FOUND: asked to fail")
    assert failed.stdout == ""
    bad = ctl(echo, "call", "bus.events.replay", '{"since": "yesterday"}')
    assert bad.returncode == 1 and "invalid request body for bus.events.replay" in bad.stderr


def test_events_replay_and_follow(echo):
    client = echo.client()
    client.call(Emit(text="seen by ctl", times=2))
    lines = ctl(echo, "--json", "events", "--topic", "echo.").stdout.splitlines()
    events = [json.loads(line) for line in lines]
    assert [e["event"]["text"] for e in events] == ["seen by ctl"] * 2
    since = events[0]["seq"]
    argv = [CTL, "--config", str(echo.config_path), "--json", "events", "--follow", "--since", str(since)]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as follower:
        try:
            first = json.loads(follower.stdout.readline())
            assert first["seq"] == since + 1
            client.call(Emit(text="live"))
            while True:
                event = json.loads(follower.stdout.readline())
                if event["topic"].startswith("echo."):
                    break
            assert event["event"]["text"] == "live"
        finally:
            follower.terminate()


def test_schema_listing_and_json_schema(host):
    listing = ctl(host, "schema")
    assert listing.returncode == 0
    assert any(line.split()[:2] == ["bus.ping", "Ping"] for line in listing.stdout.splitlines()[1:])
    schema = json.loads(ctl(host, "schema", "bus.events.replay").stdout)
    assert "since" in json.dumps(schema)
    unknown = ctl(host, "schema", "nope.nothing")
    assert unknown.returncode == 1 and "unknown schema type" in unknown.stderr


def test_unreachable_broker_fails_fast_and_clearly(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"bus": {"run_dir": "/tmp/bh-nobody-here"}, "data_dir": str(tmp_path)}))
    started = time.monotonic()
    result = subprocess.run(
        [CTL, "--config", str(config), "--timeout", "1", "ping"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert "is the host running" in result.stderr
    assert result.stdout == ""
    assert time.monotonic() - started < 15
