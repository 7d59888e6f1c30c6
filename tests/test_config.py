"""The host configuration: sources and their precedence, every class of bad value, paths, dumps."""

from __future__ import annotations

import json
import os
import stat
from importlib.metadata import EntryPoint
from pathlib import Path

import msgspec
import orjson
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from baaaht.common import config_rules
from baaaht.common.config import (
    LEAF_TYPES,
    ConfigError,
    dump_config,
    dump_flat,
    load_config,
    read_effective_sources,
    write_effective_config,
)
from baaaht.common.units import dec_hook, parse_duration, parse_size, render_duration, render_size
from baaaht.schemas.config import Config


def write_config(directory: Path, document: dict, suffix: str = ".yaml") -> Path:
    path = directory / f"config{suffix}"
    path.write_text(json.dumps(document) if suffix == ".json" else yaml.safe_dump(document))
    return path


def problems_of(excinfo: pytest.ExceptionInfo[ConfigError]) -> list[str]:
    return excinfo.value.problems


# --- sources and precedence --------------------------------------------------------------------


def test_every_rule_names_a_key_of_the_config():
    """A rule left behind by a renamed key would never check anything."""
    assert set(config_rules.RULES) <= set(LEAF_TYPES)


def test_defaults_alone_give_the_default_config():
    config, sources = load_config(None, env={})
    assert config == Config()
    assert set(sources) == set(dump_flat(config))
    assert set(sources.values()) == {"default"}


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
def test_precedence_is_flags_then_env_then_file_then_defaults(tmp_path, suffix):
    path = write_config(tmp_path, {"session": {"timeout": "10m", "max_sessions": 5}}, suffix)
    env = {"ORCHESTRATOR_SESSION__TIMEOUT": "20m", "ORCHESTRATOR_LOG__LEVEL": "debug"}
    flags = {"session.timeout": "45m", "policy.max_containers": None}

    config, sources = load_config(str(path), env=env, flags=flags)
    assert config.session.timeout == 45 * 60
    assert sources["session.timeout"] == "flag"
    assert config.log.level == "debug"
    assert sources["log.level"] == "env:ORCHESTRATOR_LOG__LEVEL"
    assert config.session.max_sessions == 5
    assert sources["session.max_sessions"] == f"file:{path}"
    assert config.policy.max_containers == 10  # a flag of None was not given
    assert sources["policy.max_containers"] == "default"

    config, sources = load_config(str(path), env=env)
    assert config.session.timeout == 20 * 60
    assert sources["session.timeout"] == "env:ORCHESTRATOR_SESSION__TIMEOUT"

    config, sources = load_config(str(path), env={})
    assert config.session.timeout == 10 * 60
    assert sources["session.timeout"] == f"file:{path}"


def test_yaml_and_json_files_give_the_same_config(tmp_path):
    document = {"bus": {"tcp_enabled": True, "tcp_port": 6000}, "policy": {"max_memory": "1GB"}}
    (tmp_path / "y").mkdir()
    (tmp_path / "j").mkdir()
    from_yaml, _ = load_config(str(write_config(tmp_path / "y", document, ".yaml")), env={})
    from_json, _ = load_config(str(write_config(tmp_path / "j", document, ".json")), env={})
    assert from_yaml == from_json
    assert from_yaml.bus.tcp_enabled is True
    assert from_yaml.policy.max_memory == 1_000_000_000


def test_a_partial_file_keeps_every_other_default_including_booleans(tmp_path):
    """The original turned omitted booleans into false (e.g. TLS verification off)."""
    path = write_config(tmp_path, {"docker": {"host": "tcp://127.0.0.1:2376"}})
    config, sources = load_config(str(path), env={})
    assert config.docker.tls_verify is True
    assert sources["docker.tls_verify"] == "default"
    assert config.docker.host == "tcp://127.0.0.1:2376"


def test_top_level_keys_come_from_env_without_a_section(tmp_path):
    config, sources = load_config(None, env={"ORCHESTRATOR_DATA_DIR": str(tmp_path)})
    assert config.data_dir == str(tmp_path)
    assert sources["data_dir"] == "env:ORCHESTRATOR_DATA_DIR"


def test_variables_without_the_prefix_are_not_settings():
    config, _ = load_config(None, env={"SESSION_TIMEOUT": "5x", "LOG_LEVEL": "loud", "DOCKER_HOST": "nope"})
    assert config == Config()


@pytest.mark.parametrize(
    ("text", "expected"),
    [("true", True), ("False", False), ("1", True), ("0", False), ("yes", True), ("off", False)],
)
def test_booleans_from_env(text, expected):
    config, _ = load_config(None, env={"ORCHESTRATOR_BUS__TCP_ENABLED": text})
    assert config.bus.tcp_enabled is expected


def test_flags_take_native_values():
    config, _ = load_config(None, env={}, flags={"bus.tcp_enabled": True, "bus.tcp_port": 7000})
    assert config.bus.tcp_enabled is True
    assert config.bus.tcp_port == 7000


def test_a_runtime_registered_as_an_entry_point_is_accepted(monkeypatch):
    registered = [EntryPoint(name="podman", value="example.podman:Runtime", group="baaaht.runtimes")]
    monkeypatch.setattr(config_rules, "entry_points", lambda group: registered)
    config, _ = load_config(None, env={"ORCHESTRATOR_RUNTIME__TYPE": "podman"})
    assert config.runtime.type == "podman"


# --- durations and sizes -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "seconds"),
    [
        ("30s", 30),
        ("30m", 1800),
        ("1h", 3600),
        ("250ms", 0.25),
        ("1h30m", 5400),
        ("45", 45),
        (45, 45),
        (1.5, 1.5),
    ],
)
def test_durations(written, seconds):
    assert parse_duration(written) == seconds


@pytest.mark.parametrize(
    ("written", "size"),
    [
        ("512MB", 512_000_000),
        ("16MiB", 16 * 1024**2),
        ("1G", 1024**3),
        ("1GB", 1000**3),
        ("1.5KB", 1500),
        ("100", 100),
        (100, 100),
        ("64b", 64),
    ],
)
def test_sizes(written, size):
    assert parse_size(written) == size


@given(st.integers(min_value=0, max_value=10**9))
def test_a_rendered_duration_reads_back_the_same(milliseconds):
    seconds = milliseconds / 1000
    assert parse_duration(render_duration(seconds)) == pytest.approx(seconds, abs=1e-9)


@given(st.integers(min_value=0, max_value=2**50))
def test_a_rendered_size_reads_back_the_same(size):
    assert parse_size(render_size(size)) == size


def test_durations_and_sizes_render_the_way_people_write_them():
    assert [render_duration(s) for s in (30, 1800, 3600, 0.25, 5400, 0)] == [
        "30s",
        "30m",
        "1h",
        "250ms",
        "90m",
        "0s",
    ]
    assert [render_size(n) for n in (512_000_000, 16 * 1024**2, 1024**3, 100)] == [
        "512MB",
        "16MiB",
        "1GiB",
        "100B",
    ]


# --- bad values --------------------------------------------------------------------------------

BAD_VALUES = [
    ("session.timeout", "5x", "is not a duration (expected e.g. 30s, 5m, 1h"),
    ("session.timeout", "-5s", "is not a duration"),
    ("session.timeout", "0s", "expected a duration above zero"),
    ("bus.heartbeat_interval", "5 minutes", "is not a duration"),
    ("policy.max_memory", "12XB", "is not a size (expected e.g. 512MB, 16MiB, 1G"),
    ("policy.max_memory", "1.5B", "is not a whole number of bytes"),
    ("policy.max_memory", "0", "expected a size above zero"),
    ("session.max_sessions", "ten", "is not an integer"),
    ("session.max_sessions", "0", "expected at least 1"),
    ("policy.max_containers", "-1", "expected at least 1"),
    ("pool.size", "9", "is above pool.max (8)"),
    ("pool.size", "-1", "expected 0, no pool, or more"),
    ("docker.tls_verify", "maybe", "is not a boolean (expected true or false)"),
    ("log.level", "loud", "is not one of debug, info, warn, error"),
    ("log.format", "xml", "is not one of json, text"),
    ("bus.tcp_port", "0", "expected a port from 1 to 65535"),
    ("bus.tcp_port", "70000", "expected a port from 1 to 65535"),
    ("bus.heartbeat_liveness", "0", "expected at least 1 missed heartbeat"),
    ("bus.event_history", "0", "expected at least 1 event"),
    ("bus.socket_group", "0", "is gid 0 (expected an unprivileged group)"),
    ("bus.socket_group", "root", "is group 0, root's (expected an unprivileged group)"),
    ("bus.socket_group", "", "is not a group name"),
    ("bus.socket_group", "Agents!", "is not a group name"),
    ("bus.run_dir", "/tmp/" + "r" * config_rules.MAX_RUN_DIR, f"at most {config_rules.MAX_RUN_DIR} bytes"),
    ("data_dir", "", "is empty"),
    ("runtime.type", "podman", "is not a known runtime (expected auto, docker, apple"),
    ("docker.host", "/var/run/docker.sock", "is not a Docker URL"),
    ("docker.tls_cert", "/etc/cert.pem", "expected docker.tls_cert and docker.tls_key together"),
    ("container.orphan_grace", "-1", "is not a duration"),
    ("workspace.size", "8MiB", "is too small (expected at least 16MiB"),
    ("limits.agent_in_flight", "0", "expected at least 1 request"),
    ("limits.agent_events_per_second", "0", "expected a rate above zero"),
    ("limits.agent_event_burst_bytes", "1MiB", "is below bus.max_event_size (2097152 bytes)"),
    ("limits.agent_bytes_in_flight", "8MiB", "is below bus.max_message_size (16777216 bytes)"),
    ("egress.refusals_per_minute", "-1", "expected 0, only summed up, or more"),
    (
        "limits.session_message_bytes_per_minute",
        "512KiB",
        "is below session.max_message_size (1048576 bytes)",
    ),
    ("limits.agent_replay_bytes_per_second", "1MiB", "is below bus.max_event_size (2097152 bytes)"),
]


@pytest.mark.parametrize(("key", "value", "expected"), BAD_VALUES)
def test_a_bad_value_in_env_is_refused_naming_key_value_expectation_and_source(key, value, expected):
    name = "ORCHESTRATOR_" + key.replace(".", "__").upper()
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, env={name: value})
    [problem] = problems_of(excinfo)
    assert problem.startswith(f"{key}: {value!r} ")
    assert expected in problem
    assert problem.endswith(f"from env:{name}")


@pytest.mark.parametrize(("key", "value", "expected"), BAD_VALUES)
def test_a_bad_value_as_a_flag_is_refused_the_same_way(key, value, expected):
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, env={}, flags={key: value})
    [problem] = problems_of(excinfo)
    assert problem.startswith(f"{key}: {value!r} ") and expected in problem and problem.endswith("from flag")


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("session", "timeout", "5x", "is not a duration"),
        ("session", "max_sessions", 1.5, "is not an integer"),
        ("session", "max_sessions", True, "is not an integer"),
        ("docker", "tls_verify", "maybe", "is not a boolean"),
        ("docker", "host", 42, "is not a string"),
        ("policy", "max_memory", [1], "is not a size"),
        ("policy", "path", None, "has no value"),
    ],
)
def test_a_bad_value_in_a_file_is_refused_naming_the_file(tmp_path, section, key, value, expected):
    path = write_config(tmp_path, {section: {key: value}})
    with pytest.raises(ConfigError) as excinfo:
        load_config(str(path), env={})
    [problem] = problems_of(excinfo)
    assert problem.startswith(f"{section}.{key}: {value!r} ")
    assert expected in problem and problem.endswith(f"from file:{path}")


def test_every_problem_is_reported_at_once(tmp_path):
    path = write_config(tmp_path, {"session": {"timeout": "5x"}, "nonsense": 1})
    env = {"ORCHESTRATOR_BUS__TCP_PORT": "0", "ORCHESTRATOR_LOG__LEVEL": "loud"}
    with pytest.raises(ConfigError) as excinfo:
        load_config(str(path), env=env, flags={"policy.max_memory": "lots"})
    keys = sorted(problem.split(":")[0] for problem in problems_of(excinfo))
    assert keys == ["bus.tcp_port", "log.level", "nonsense", "policy.max_memory", "session.timeout"]
    assert str(excinfo.value).count("\n") == 4


# --- unknown keys ------------------------------------------------------------------------------


def test_unknown_keys_in_a_file_are_refused_by_name(tmp_path):
    path = write_config(tmp_path, {"sesion": {"timeout": "5m"}, "bus": {"run_dri": "/tmp/x"}})
    with pytest.raises(ConfigError) as excinfo:
        load_config(str(path), env={})
    assert sorted(problems_of(excinfo)) == [
        f"bus.run_dri: unknown key; from file:{path}",
        f"sesion: unknown key; from file:{path}",
    ]


def test_a_section_written_as_a_value_is_refused(tmp_path):
    path = write_config(tmp_path, {"session": "30m"})
    with pytest.raises(ConfigError, match=r"session: '30m' is a section \(expected a mapping of its keys\)"):
        load_config(str(path), env={})


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("ORCHESTRATOR_SESSION_TIMEOUT", "did you mean ORCHESTRATOR_SESSION__TIMEOUT?"),
        ("ORCHESTRATOR_NOPE", "unknown setting (expected ORCHESTRATOR_<SECTION>__<KEY>"),
        ("ORCHESTRATOR_SESSION__TIMEOT", "unknown setting"),
        ("ORCHESTRATOR_SESSION", "names the section session (expected ORCHESTRATOR_SESSION__<KEY>)"),
    ],
)
def test_unknown_env_settings_are_refused_by_name(name, expected):
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, env={name: "30m"})
    [problem] = problems_of(excinfo)
    assert problem.startswith(f"{name}: ") and expected in problem


def test_an_unknown_flag_key_is_refused():
    with pytest.raises(ConfigError, match=r"session\.timeot: unknown setting \(given as a flag\)"):
        load_config(None, env={}, flags={"session.timeot": "5m"})


# --- the file itself ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("config.toml", "x = 1", "has an unknown extension (expected .yaml, .yml or .json)"),
        ("config.yaml", " \n", "is empty"),
        ("config.yaml", "session: [unclosed", "is not valid YAML"),
        ("config.json", "{", "is not valid JSON"),
        ("config.yaml", "- a\n- b\n", "must hold a mapping of sections, not list"),
    ],
)
def test_a_bad_file_is_refused(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ConfigError) as excinfo:
        load_config(str(path), env={})
    assert str(path) in str(excinfo.value) and expected in str(excinfo.value)


def test_a_missing_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config(str(tmp_path / "absent.yaml"), env={})


# --- paths -------------------------------------------------------------------------------------


def test_tilde_is_expanded_in_path_keys_from_every_source(tmp_path):
    home = tmp_path / "home"
    path = write_config(
        tmp_path, {"policy": {"path": "~/policies.yaml"}, "docker": {"tls_ca_cert": "~/ca.pem"}}
    )
    env = {"HOME": str(home), "ORCHESTRATOR_DATA_DIR": "~/state"}
    config, _ = load_config(str(path), env=env, flags={"bus.run_dir": "~/run"})
    assert config.policy.path == f"{home}/policies.yaml"
    assert config.docker.tls_ca_cert == f"{home}/ca.pem"
    assert config.data_dir == f"{home}/state"
    assert config.bus.run_dir == f"{home}/run"


def test_the_config_path_itself_may_start_with_tilde(tmp_path):
    write_config(tmp_path, {"session": {"timeout": "1h"}})
    config, sources = load_config("~/config.yaml", env={"HOME": str(tmp_path)})
    assert config.session.timeout == 3600
    assert sources["session.timeout"] == f"file:{tmp_path}/config.yaml"


def test_relative_paths_are_taken_from_the_file_or_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "etc").mkdir()
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    path = write_config(tmp_path / "etc", {"policy": {"path": "policies.yaml"}})
    config, _ = load_config(str(path), env={"ORCHESTRATOR_DATA_DIR": "state"})
    assert config.policy.path == f"{tmp_path}/etc/policies.yaml"
    assert config.data_dir == f"{tmp_path}/cwd/state"


def test_an_empty_path_stays_empty():
    config, _ = load_config(None, env={"ORCHESTRATOR_POLICY__PATH": ""})
    assert config.policy.path == ""


# --- dumps and the effective config ------------------------------------------------------------


def test_the_dump_is_json_and_reads_back_as_the_same_config(tmp_path):
    config, _ = load_config(
        None,
        env={},
        flags={"session.timeout": "1h30m", "policy.max_memory": "1G", "bus.heartbeat_interval": "250ms"},
    )
    dumped = dump_config(config)
    assert dumped["session"]["timeout"] == "90m"
    assert dumped["policy"]["max_memory"] == "1GiB"
    assert dumped["bus"]["heartbeat_interval"] == "250ms"
    assert dump_config(Config())["policy"]["max_memory"] == "512MB"
    path = tmp_path / "dumped.json"
    path.write_bytes(orjson.dumps(dumped))
    reloaded, _ = load_config(str(path), env={})
    assert reloaded == config


def test_the_effective_config_is_private_and_loads_back(tmp_path):
    config, sources = load_config(None, env={"ORCHESTRATOR_SESSION__TIMEOUT": "45m"})
    written = write_effective_config(config, sources, tmp_path)
    assert stat.S_IMODE(os.stat(written).st_mode) == 0o600
    reloaded, reloaded_sources = load_config(str(written), env={})
    assert reloaded == config
    assert set(reloaded_sources.values()) == {f"file:{written}"}
    assert read_effective_sources(tmp_path) == sources
    assert read_effective_sources(tmp_path / "elsewhere") is None


def test_the_config_model_refuses_unknown_fields_on_its_own():
    with pytest.raises(msgspec.ValidationError, match="Object contains unknown field `nope`"):
        msgspec.convert({"session": {"nope": 1}}, Config, dec_hook=dec_hook)
