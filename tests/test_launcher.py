"""baaaht-orchestrator: its flags, the run it prepares, and a real host under supervisord."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from supervisor.options import ClientOptions, ServerOptions

from baaaht.bus.client import BusClient
from baaaht.common.config import ConfigError, load_config
from baaaht.host.launcher import (
    HostAlreadyRunning,
    build_parser,
    flags_from,
    main,
    prepare_run,
    render_supervisord_conf,
)
from baaaht.schemas.bus import Ping
from tests.harness import wait_for

PROGRAMS = {
    "broker": "baaaht.bus.broker",
    "policy": "baaaht.services.policy",
    "container": "baaaht.services.containers",
    "session": "baaaht.services.sessions",
}


@pytest.fixture
def run_dir():
    # ipc:// socket paths are limited to ~107 bytes: pytest's tmp_path is too long for a run directory.
    path = Path(tempfile.mkdtemp(prefix="bl-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# --- flags -------------------------------------------------------------------------------------


def test_flags_become_dotted_settings():
    args = build_parser().parse_args(
        ["--session-timeout", "45m", "--no-tcp", "--data-dir", "/srv/baaaht", "--set", "bus.event_history=50"]
    )
    assert flags_from(args) == {
        "session.timeout": "45m",
        "bus.tcp_enabled": False,
        "data_dir": "/srv/baaaht",
        "bus.event_history": "50",
    }


def test_a_named_flag_beats_set_for_the_same_key():
    args = build_parser().parse_args(["--set", "session.timeout=5m", "--session-timeout", "45m"])
    assert flags_from(args) == {"session.timeout": "45m"}


def test_set_needs_key_and_value():
    with pytest.raises(ConfigError, match=r"--set 'session\.timeout': expected KEY=VALUE"):
        flags_from(build_parser().parse_args(["--set", "session.timeout"]))


def test_a_bad_flag_stops_the_launcher_before_anything_is_written(run_dir):
    with pytest.raises(SystemExit) as excinfo:
        main(["--run-dir", str(run_dir), "--data-dir", str(run_dir / "data"), "--max-memory", "lots"])
    message = str(excinfo.value.code)
    assert "policy.max_memory: 'lots' is not a size (expected e.g. 512MB" in message
    assert list(run_dir.iterdir()) == []


# --- the prepared run --------------------------------------------------------------------------


def prepared(run_dir: Path, environ: dict[str, str] | None = None):
    config, sources = load_config(
        None, env={}, flags={"bus.run_dir": str(run_dir), "data_dir": str(run_dir / "data")}
    )
    return config, prepare_run(config, sources, environ or {})


def test_the_run_has_private_directories_and_files(run_dir):
    config, run = prepared(run_dir)
    assert mode_of(run_dir) == 0o750
    assert mode_of(run_dir / "logs") == 0o750
    assert mode_of(run_dir / "data") == 0o700
    assert mode_of(run.config_path) == 0o600
    assert mode_of(run.supervisord_conf) == 0o600
    assert load_config(str(run.config_path), env={})[0] == config


def test_the_children_get_the_effective_config_and_no_orchestrator_variables(run_dir):
    _, run = prepared(run_dir, {"ORCHESTRATOR_SESSION__TIMEOUT": "5m", "PATH": "/usr/bin"})
    assert run.environment["BAAAHT_CONFIG"] == str(run.config_path)
    assert run.environment["BAAAHT_PYTHON"] == sys.executable
    assert run.environment["PATH"] == "/usr/bin"
    assert not [name for name in run.environment if name.startswith("ORCHESTRATOR_")]
    assert "BAAAHT_SUPERVISOR_PASSWORD" not in run.environment


def test_supervisord_reads_the_run_config(run_dir):
    _, run = prepared(run_dir)
    options = ServerOptions()
    options.realize(args=["-c", str(run.supervisord_conf)])

    programs = {group.name: group.process_configs[0] for group in options.process_group_configs}
    assert set(programs) == set(PROGRAMS)
    priorities = {group.name: group.priority for group in options.process_group_configs}
    assert priorities["broker"] < min(priority for name, priority in priorities.items() if name != "broker")
    for name, module in PROGRAMS.items():
        program = programs[name]
        assert program.command == f'"{sys.executable}" -m {module} --config "{run.config_path}"'
        assert program.stdout_logfile == str(run_dir / "logs" / f"{name}.log")
        assert program.stopsignal == signal.SIGTERM
        assert program.autorestart
        assert program.uid is None

    assert options.uid == os.getuid()  # keeps the launching user: no "running as root" CRIT line
    options.set_uid_or_exit()
    assert options.parse_criticals == []
    assert options.logfile == str(run_dir / "logs" / "supervisord.log")
    assert options.nodaemon
    [server] = options.configroot.supervisord.server_configs
    assert server["file"] == str(run_dir / "supervisor.sock")
    assert server["chmod"] == 0o700
    assert server["username"] and server["password"]

    client = ClientOptions()
    client.configfile = str(run.supervisord_conf)
    client.process_config(do_usage=False)
    assert client.serverurl == f"unix://{run_dir}/supervisor.sock"
    assert (client.username, client.password) == (server["username"], server["password"])


def test_each_run_gets_its_own_supervisor_password(run_dir):
    _, first = prepared(run_dir)
    first_text = first.supervisord_conf.read_text()
    _, second = prepared(run_dir)
    assert first_text != second.supervisord_conf.read_text()


def test_rendering_refuses_a_placeholder_it_has_no_value_for():
    with pytest.raises(KeyError, match=r"%\(ENV_BAAAHT_NOPE\)s"):
        render_supervisord_conf("command = %(ENV_BAAAHT_NOPE)s", {})
    assert render_supervisord_conf("a = %(ENV_BAAAHT_X)s %(program_name)s", {"BAAAHT_X": "5%"}) == (
        "a = 5%% %(program_name)s"
    )


def test_a_second_host_on_the_same_run_directory_is_refused(run_dir):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(run_dir / "supervisor.sock"))
        listener.listen()
        with pytest.raises(HostAlreadyRunning, match=f"a host is already running on {run_dir}"):
            prepared(run_dir)


# --- a real host -------------------------------------------------------------------------------


def children_of(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # exited while we looked
            if int(fields[1]) == pid:
                found.add(int(entry.name))
    return found


def is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def supervisorctl_status(conf: Path) -> str:
    # A fresh supervisorctl each time: an XML-RPC client that failed once stays broken.
    result = subprocess.run(
        [sys.executable, "-m", "supervisor.supervisorctl", "-c", str(conf), "status"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    return result.stdout


def test_the_host_runs_the_broker_under_supervisord_and_stops_on_ctrl_c(run_dir):
    launcher = Path(sys.executable).with_name("baaaht-orchestrator")
    data_dir = run_dir / "data"
    env = {name: value for name, value in os.environ.items() if not name.startswith("ORCHESTRATOR_")}
    host = subprocess.Popen(
        [str(launcher), "--run-dir", str(run_dir), "--data-dir", str(data_dir), "--log-format", "text"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    children: set[int] = set()
    try:
        conf = run_dir / "supervisord.conf"
        wait_for(
            lambda: any(
                line.split()[:2] == ["broker", "RUNNING"] for line in supervisorctl_status(conf).splitlines()
            ),
            timeout=30,
            what="supervisorctl to show the broker RUNNING",
        )
        config, _ = load_config(str(run_dir / "config.json"), env={})
        with BusClient.for_config(config, timeout=5) as client:
            assert client.call(Ping()) is not None
        children = children_of(host.pid)  # the launcher became supervisord: its children are the host
        assert children

        host.send_signal(signal.SIGINT)
        assert host.wait(timeout=60) == 0
        assert [pid for pid in children if is_running(pid)] == []
        assert "CRIT" not in (run_dir / "logs" / "supervisord.log").read_text()
    finally:
        if host.poll() is None:
            host.terminate()
            host.wait(timeout=60)
        for pid in children:
            if is_running(pid):
                os.kill(pid, signal.SIGKILL)
