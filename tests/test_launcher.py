"""baaaht-orchestrator: its flags, the run it prepares, and a real host under supervisord."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import msgspec
import pytest
from supervisor.options import ClientOptions, ServerOptions

from baaaht.bus.client import BusClient
from baaaht.bus.errors import BusError
from baaaht.bus.testing import short_run_dir, wait_for
from baaaht.common.config import ConfigError, load_config
from baaaht.common.mounts import unmount_beneath
from baaaht.host.launcher import (
    HostAlreadyRunning,
    build_parser,
    flags_from,
    main,
    prepare_run,
    render_supervisord_conf,
)
from baaaht.schemas.bus import BusPing
from baaaht.schemas.policy import PolicyGet, PolicyReloaded

PROGRAMS = {
    "broker": "baaaht.bus.broker",
    "policy": "baaaht.services.policy",
    "container": "baaaht.services.containers",
    "session": "baaaht.services.sessions",
    "credential": "baaaht.services.credentials",
    "scheduler": "baaaht.services.scheduler",
}


# Runs argv[2:] with SIGINT set to argv[1] (SIG_DFL or SIG_IGN): exec keeps a default or ignored disposition,
# so the program starts with it whatever this test process inherited (a suite run as a background job
# inherits SIGINT ignored).
_WITH_SIGINT = (
    "import os, signal, sys; signal.signal(signal.SIGINT, getattr(signal, sys.argv[1]));"
    " os.execvp(sys.argv[2], sys.argv[2:])"
)


def with_sigint(disposition: str, argv: list[str]) -> list[str]:
    """argv started with SIGINT "SIG_DFL" (as a foreground command in a terminal) or "SIG_IGN"."""
    return [sys.executable, "-c", _WITH_SIGINT, disposition, *argv]


@pytest.fixture
def run_dir():
    path = Path(short_run_dir("bl-"))
    yield path
    # The host's mounts (the container manager's shared pool directory) outlive it: taken down before the
    # directory is removed (the fixture's teardown comes after `launch`'s, which stops the hosts).
    unmount_beneath(str(path))
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


def prepared(run_dir: Path, environ: dict[str, str] | None = None, flags: dict[str, str] | None = None):
    config, sources = load_config(
        None, env={}, flags={"bus.run_dir": str(run_dir), "data_dir": str(run_dir / "data"), **(flags or {})}
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


def program_commands(conf: Path) -> dict[str, str]:
    options = ServerOptions()
    options.configfile = str(conf)
    options.process_config(do_usage=False)
    return {group.name: group.process_configs[0].command for group in options.process_group_configs}


def test_only_the_credential_service_starts_with_the_passphrase_variable(run_dir):
    _, run = prepared(run_dir, flags={"credentials.passphrase_env": "MASTER_PASSPHRASE"})
    commands = program_commands(run.supervisord_conf)
    assert set(commands) == set(PROGRAMS)
    for name, command in commands.items():
        stripped = command.startswith("/usr/bin/env -u MASTER_PASSPHRASE ")
        assert stripped == (name != "credential"), command
    plain = run_dir / "plain"
    plain.mkdir()
    _, run = prepared(plain)  # no passphrase variable: nothing to remove
    assert not [command for command in program_commands(run.supervisord_conf).values() if "env -u" in command]


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


def descendants_of(pid: int) -> set[int]:
    found = children_of(pid)
    for child in list(found):
        found |= descendants_of(child)
    return found


def is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def supervisorctl_status(conf: Path) -> dict[str, tuple[str, str]]:
    """Program name -> (state, pid text); a fresh supervisorctl each time: an XML-RPC client that failed
    once stays broken."""
    result = subprocess.run(
        [sys.executable, "-m", "supervisor.supervisorctl", "-c", str(conf), "status"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    status = {}
    for line in result.stdout.splitlines():
        words = line.split()
        if len(words) >= 2:
            status[words[0]] = (words[1], words[3].rstrip(",") if len(words) > 3 else "")
    return status


class Launched:
    """One real `baaaht-orchestrator` process and what it started."""

    def __init__(self, run_dir: Path, data_dir: Path, sigint: str, args: list[str], environ: dict[str, str]):
        self.run_dir = run_dir
        self.conf = run_dir / "supervisord.conf"
        self.stderr_path = run_dir.with_name(run_dir.name + ".launcher.log")
        launcher = Path(sys.executable).with_name("baaaht-orchestrator")
        argv = [str(launcher), "--run-dir", str(run_dir), "--data-dir", str(data_dir), "--log-format", "text"]
        argv += [
            "--set",
            f"credentials.master_key_file={run_dir / 'keys' / 'credentials.key'}",  # not in /etc
            "--set",
            "pool.size=0",  # no warm pool: its containers would outlive the host (the pool has its own tests)
        ]
        env = {name: value for name, value in os.environ.items() if not name.startswith("ORCHESTRATOR_")}
        env.update(environ)
        with open(self.stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(
                with_sigint(sigint, argv + args), env=env, stdout=subprocess.DEVNULL, stderr=stderr
            )
        self.started: set[int] = set()

    def wait_running(self, programs=tuple(PROGRAMS)) -> dict[str, str]:
        """Wait until supervisorctl shows every program RUNNING; their pids."""

        def all_running():
            status = supervisorctl_status(self.conf)
            return all(status.get(name, ("",))[0] == "RUNNING" for name in programs) and status

        status = wait_for(all_running, timeout=60, what=f"supervisorctl to show {programs} RUNNING")
        self.started |= descendants_of(self.process.pid)
        return {name: status[name][1] for name in programs}

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.started |= descendants_of(self.process.pid)
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        for pid in self.started:
            if is_running(pid):
                os.kill(pid, signal.SIGKILL)
        self.stderr_path.unlink(missing_ok=True)


@pytest.fixture
def launch(run_dir):
    launched: list[Launched] = []

    def start(
        *args: str,
        sigint: str = "SIG_DFL",
        run: Path | None = None,
        data: Path | None = None,
        environ: dict[str, str] | None = None,
    ):
        host = Launched(run or run_dir, data or run_dir / "data", sigint, list(args), environ or {})
        launched.append(host)
        return host

    yield start
    for host in launched:
        host.stop()


decode_reloaded = msgspec.msgpack.Decoder(PolicyReloaded).decode


def bus_client(run_dir: Path) -> BusClient:
    config, _ = load_config(str(run_dir / "config.json"), env={})
    return BusClient.for_config(config, timeout=5)


def test_the_host_runs_under_supervisord_and_stops_on_ctrl_c(launch):
    host = launch()
    host.wait_running()
    with bus_client(host.run_dir) as client:  # RUNNING is 1 s up: a loaded machine's broker may bind later
        assert wait_for(lambda: client.call(BusPing()), timeout=30, what="the broker to answer") is not None
    started = descendants_of(host.process.pid)  # supervisord and, below it, the host's processes
    assert len(started) >= 1 + len(PROGRAMS)

    host.process.send_signal(signal.SIGINT)
    assert host.process.wait(timeout=60) == 0
    assert [pid for pid in started if is_running(pid)] == []
    assert "CRIT" not in (host.run_dir / "logs" / "supervisord.log").read_text()


def environ_of(pid: str) -> dict[str, str]:
    entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(entry.decode(errors="replace").partition("=")[::2] for entry in entries if entry)


def test_the_passphrase_variable_reaches_the_credential_process_alone(launch):
    passphrase = "correct horse battery staple 0f3a"
    host = launch(
        "--set",
        "credentials.passphrase_env=BAAAHT_TEST_PASSPHRASE",
        environ={"BAAAHT_TEST_PASSPHRASE": passphrase},
    )
    pids = host.wait_running()  # the credential service opened its store with the passphrase
    holding = {
        name for name, pid in pids.items() if environ_of(pid).get("BAAAHT_TEST_PASSPHRASE") == passphrase
    }
    assert holding == {"credential"}
    assert all(
        environ_of(pid)["BAAAHT_CONFIG"] for pid in pids.values()
    )  # the rest of the environment is kept


def test_a_host_started_with_sigint_ignored_keeps_ignoring_it_and_stops_on_sigterm(launch):
    host = launch(sigint="SIG_IGN")  # as a background job of a script: Ctrl-C is for the foreground
    pids = host.wait_running(("broker",))
    host.process.send_signal(signal.SIGINT)
    with bus_client(host.run_dir) as client:
        assert client.call(BusPing()) is not None  # answered after the SIGINT: the host is still up
    assert host.process.poll() is None
    assert supervisorctl_status(host.conf)["broker"] == ("RUNNING", pids["broker"])

    host.process.send_signal(signal.SIGTERM)
    assert host.process.wait(timeout=60) == 0


def test_a_second_host_on_the_same_data_directory_is_refused_naming_the_holder(launch, run_dir):
    first = launch()
    first.wait_running(("broker",))
    other_run_dir = Path(short_run_dir("bl-"))
    try:
        second = launch(run=other_run_dir, data=run_dir / "data")
        assert second.process.wait(timeout=30) != 0
        refusal = second.log()
        assert f"data directory {run_dir / 'data'} is in use by another host" in refusal
        assert f"pid {first.process.pid}, run directory {run_dir}, started 20" in refusal
        assert not (other_run_dir / "supervisord.conf").exists()  # refused before anything was written
    finally:
        unmount_beneath(str(other_run_dir))
        shutil.rmtree(other_run_dir, ignore_errors=True)
    with bus_client(run_dir) as client:
        assert client.call(BusPing()) is not None  # the first host never noticed


def test_sighup_reloads_the_policy_without_restarting_anything(launch, run_dir):
    config_file = run_dir.with_name(run_dir.name + ".config.json")
    policy_file = run_dir.with_name(run_dir.name + ".policy.yaml")
    policy_file.write_text("mode: strict\nquotas:\n  max_pids: 300\n")
    settings = {
        "policy": {"path": str(policy_file), "reload_interval": "1h"},  # only SIGHUP reloads
        # 10 s of silence before a peer counts as gone, not 3: a stall of a loaded machine is no dropped call
        "bus": {"heartbeat_liveness": 10},
    }
    config_file.write_text(json.dumps({**settings, "session": {"timeout": "30m"}}))
    try:
        host = launch("--config", str(config_file))
        pids = host.wait_running()
        served, failed, stop = [], [], threading.Event()

        def keep_calling():
            with bus_client(run_dir) as client:
                while not stop.is_set():
                    try:
                        served.append(client.call(PolicyGet()).version)
                    except BusError as error:
                        failed.append(error)

        with bus_client(run_dir) as client, client.subscribe(["policy."]) as events:
            first = wait_for(lambda: client.call(PolicyGet()), timeout=30, what="the policy service").version
            caller = threading.Thread(target=keep_calling)
            caller.start()
            try:
                wait_for(lambda: len(served) > 10, what="calls to flow")
                policy_file.write_text("mode: strict\nquotas:\n  max_pids: 400\n")
                config_file.write_text(json.dumps({**settings, "session": {"timeout": "45m"}}))
                host.process.send_signal(signal.SIGHUP)
                wait_for(
                    lambda: (
                        (delivery := events.next(timeout=0.5))
                        and delivery.topic == "policy.reloaded"
                        and decode_reloaded(delivery.body).previous_version == first
                    ),
                    timeout=30,
                    what="a policy.reloaded event from the policy in force",
                )
                count = len(served)
                wait_for(lambda: len(served) > count + 10, what="calls to flow after the reload")
            finally:
                stop.set()
                caller.join(10)
        assert failed == []  # no call in flight was dropped
        assert served[0] == first != served[-1]
        assert host.process.poll() is None
        assert {name: pid for name, (_state, pid) in supervisorctl_status(host.conf).items()} == pids
        notice = wait_for(
            lambda: [line for line in host.log().splitlines() if "takes effect at the next restart" in line],
            what="the restart notice",
        )
        assert ['key="session.timeout"' in line for line in notice] == [True]
        assert json.loads((run_dir / "config.json").read_text())["session"]["timeout"] == "30m"
    finally:
        config_file.unlink(missing_ok=True)
        policy_file.unlink(missing_ok=True)
