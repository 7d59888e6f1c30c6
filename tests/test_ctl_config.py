"""`baaaht-ctl config show`: the host's effective config and the source of every value."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from baaaht.bus.testing import short_run_dir
from baaaht.common.config import dump_config, load_config, write_effective_config
from baaaht.ctl.main import app


@pytest.fixture
def run_dir():
    path = Path(short_run_dir("bcc-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def ctl_config(tmp_path, run_dir, monkeypatch):
    """baaaht-ctl's own config: it only tells where the run directory is."""
    monkeypatch.delenv("BAAAHT_RUN_DIR", raising=False)
    path = tmp_path / "ctl.json"
    path.write_text(json.dumps({"bus": {"run_dir": str(run_dir)}}))
    return path


def show(config_path, *extra: str, expect: int = 0):
    result = CliRunner().invoke(app, ["--config", str(config_path), "config", "show", *extra])
    assert result.exit_code == expect, result.output
    return result


def test_show_reports_the_hosts_config_with_its_sources(monkeypatch, run_dir, ctl_config):
    host_config, host_sources = load_config(
        None,
        env={"ORCHESTRATOR_SESSION__TIMEOUT": "45m"},
        flags={"bus.run_dir": str(run_dir), "policy.max_memory": "1G"},
    )
    written = write_effective_config(host_config, host_sources, run_dir)
    monkeypatch.setenv("ORCHESTRATOR_LOG__LEVEL", "debug")  # baaaht-ctl's environment is not the host's

    shown = orjson.loads(show(ctl_config, "--json").stdout)
    assert shown["origin"] == str(written)
    assert shown["config"] == dump_config(host_config)
    assert shown["sources"]["session.timeout"] == "env:ORCHESTRATOR_SESSION__TIMEOUT"
    assert shown["sources"]["policy.max_memory"] == "flag"
    assert shown["sources"]["log.level"] == "default"
    assert shown["config"]["log"]["level"] == "info"

    rows = show(ctl_config).stdout.splitlines()
    assert rows[0].split() == ["KEY", "VALUE", "SOURCE"]
    assert ["session.timeout", "45m", "env:ORCHESTRATOR_SESSION__TIMEOUT"] in [row.split() for row in rows]
    assert ["policy.max_memory", "1GiB", "flag"] in [row.split() for row in rows]


def test_show_without_a_host_resolves_the_config_here_and_says_so(monkeypatch, ctl_config):
    monkeypatch.setenv("ORCHESTRATOR_SESSION__TIMEOUT", "20m")
    shown = orjson.loads(show(ctl_config, "--json").stdout)
    assert shown["origin"].startswith("resolved here")
    assert shown["config"]["session"]["timeout"] == "20m"
    assert shown["sources"]["session.timeout"] == "env:ORCHESTRATOR_SESSION__TIMEOUT"
    assert shown["sources"]["bus.run_dir"] == f"file:{ctl_config}"


def test_show_with_a_bad_config_fails_with_the_problem(monkeypatch, ctl_config):
    monkeypatch.setenv("ORCHESTRATOR_SESSION__TIMEOUT", "5x")
    result = show(ctl_config, expect=1)
    assert "session.timeout: '5x' is not a duration" in result.output


def test_run_dir_flag_and_variable_point_at_another_host(monkeypatch, run_dir, tmp_path):
    host_config, host_sources = load_config(None, env={}, flags={"bus.run_dir": str(run_dir)})
    written = write_effective_config(host_config, host_sources, run_dir)
    elsewhere = tmp_path / "ctl.json"
    elsewhere.write_text(json.dumps({"bus": {"run_dir": str(tmp_path / "no-host-here")}}))
    monkeypatch.delenv("BAAAHT_RUN_DIR", raising=False)
    assert orjson.loads(show(elsewhere, "--json").stdout)["origin"].startswith("resolved here")

    flagged = CliRunner().invoke(
        app, ["--config", str(elsewhere), "--run-dir", str(run_dir), "config", "show"]
    )
    assert flagged.exit_code == 0 and f"# {written}" in flagged.stderr
    monkeypatch.setenv("BAAAHT_RUN_DIR", str(run_dir))
    assert orjson.loads(show(elsewhere, "--json").stdout)["origin"] == str(written)
