"""`baaaht-orchestrator`: run the whole host (broker and services) under supervisord.

It loads the configuration (file, environment, flags), locks the data directory (one host per
data directory, see host/datalock.py), prepares the run directory (effective config,
supervisord config, logs), then runs `supervisord -n` as its child and stays in front of it:

- SIGTERM, and SIGINT (Ctrl-C) unless it was ignored when the launcher started (a background
  job of a script: `&` without job control ignores it so that Ctrl-C reaches only the
  foreground command), stop the host: supervisord stops every child (TERM, then KILL after
  the program's stop timeout) and the launcher exits with supervisord's status.
- SIGHUP reloads without restarting anything: the configuration is resolved again from the
  same file, environment and flags, and a key that changed is logged as needing a restart
  (every process reads its configuration at start); each service gets SIGHUP through
  supervisord and runs its reload hook (the policy service reads its policy file again). supervisord's own
  SIGHUP handling, which restarts every process, is never used.

supervisord runs in its own session, so signals from the terminal reach only the launcher.
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import logging
import os
import pwd
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import msgspec

from baaaht.common.config import (
    ENV_PREFIX,
    ConfigError,
    dump_flat,
    load_config,
    write_effective_config,
    write_private_file,
)
from baaaht.common.logs import setup_logging
from baaaht.host import agent_images
from baaaht.host.datalock import DataDirInUse, DataDirLock
from baaaht.schemas.config import Config

log = logging.getLogger("baaaht.launcher")

SUPERVISORD_CONF = "supervisord.conf"
SUPERVISOR_SOCKET = "supervisor.sock"
LOG_DIR = "logs"
RUN_DIR_MODE = 0o750  # the bus sockets are for their owner and group; nobody else
DATA_DIR_MODE = 0o700
# Programs that take SIGHUP as "reload" (every service: bus/runner.py calls its on_reload). The launcher
# forwards its SIGHUP to these only: the broker has no reload, and SIGHUP would end it.
RELOAD_ON_SIGHUP = ("policy", "container", "session", "scheduler")
SUPERVISORCTL_TIMEOUT = 15.0  # seconds; supervisord answers at once unless it is stuck
WAIT_INTERVAL = 0.2  # seconds between checks for a requested reload while supervisord runs
ENV_COMMAND = "/usr/bin/env"  # coreutils: on the host and in the orchestrator image
_PLACEHOLDER = re.compile(r"%\(ENV_(BAAAHT_[A-Z0-9_]+)\)s")

# (flag, dotted key, help): every flag is a plain setting, validated like the file and environment.
SETTING_FLAGS = (
    ("--data-dir", "data_dir", "directory for the host's state"),
    ("--run-dir", "bus.run_dir", "directory for sockets, the effective config and logs"),
    ("--log-level", "log.level", "debug, info, warn or error"),
    ("--log-format", "log.format", "json or text"),
    ("--docker-host", "docker.host", "Docker engine URL"),
    ("--runtime", "runtime.type", "container runtime: auto, docker, apple or a registered one"),
    ("--runtime-timeout", "runtime.timeout", "timeout of one runtime operation"),
    ("--session-timeout", "session.timeout", "session timeout"),
    ("--max-sessions", "session.max_sessions", "sessions open at once"),
    ("--max-containers", "policy.max_containers", "containers running at once"),
    ("--max-memory", "policy.max_memory", "memory limit of one container"),
    ("--policy-path", "policy.path", "policy file"),
    ("--agent-image", "container.agent_image", "image agent containers run"),
    ("--tcp-host", "bus.tcp_host", "address the bus also listens on when --tcp is given"),
    ("--tcp-port", "bus.tcp_port", "first of the three TCP ports of the bus"),
)


TCP_FLAG_KEY = "bus.tcp_enabled"

# The seed's assistant flags. A boolean is `--flag` (true) or `--flag=false`; --assistant-args is a
# comma-separated list (`--assistant-args=-lc,"npm install, then run"`: CSV quoting keeps a comma).
ASSISTANT_BOOL_FLAGS = (
    ("--assistant-autostart", "assistant.autostart", "start the session's assistant on a user message"),
    ("--assistant-dev-mode", "assistant.dev_mode", "bind-mount --assistant-dev-source for fast iteration"),
    (
        "--assistant-readonly-rootfs",
        "assistant.readonly_rootfs",
        "read-only root filesystem (=false only with --assistant-dev-mode: a logged exception)",
    ),
)
ASSISTANT_FLAGS = (
    ("--assistant-image", "assistant.image", "image of the assistant (default: container.agent_image)"),
    ("--assistant-command", "assistant.command", "program the assistant container runs"),
    ("--assistant-workdir", "assistant.workdir", "working directory inside the assistant container"),
    ("--assistant-dev-source", "assistant.dev_source", "host directory mounted in dev mode"),
)
ASSISTANT_ARGS_KEY = "assistant.args"


def build_parser() -> argparse.ArgumentParser:
    defaults = dump_flat(Config())
    parser = argparse.ArgumentParser(
        prog="baaaht-orchestrator",
        description="Run the baaaht host (bus broker and services) under supervisord, in the foreground.",
        epilog=f"Every setting can also come from the config file or from {ENV_PREFIX}<SECTION>__<KEY>. "
        "Precedence: flags > environment > file > defaults.",
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {importlib.metadata.version('baaaht')}"
    )
    parser.add_argument("--config", metavar="FILE", help="YAML (.yaml, .yml) or JSON (.json) config file")
    for flag, key, text in SETTING_FLAGS:
        parser.add_argument(
            flag, dest=key, metavar="VALUE", help=f"{text} [{key}, default {defaults[key]!r}]"
        )
    parser.add_argument(
        "--tcp",
        dest=TCP_FLAG_KEY,
        action=argparse.BooleanOptionalAction,
        help=f"also listen on TCP (loopback unless --tcp-host says otherwise) [{TCP_FLAG_KEY}, default off]",
    )
    for flag, key, text in ASSISTANT_FLAGS:
        parser.add_argument(
            flag, dest=key, metavar="VALUE", help=f"{text} [{key}, default {defaults[key]!r}]"
        )
    for flag, key, text in ASSISTANT_BOOL_FLAGS:
        parser.add_argument(
            flag,
            dest=key,
            nargs="?",
            const="true",
            metavar="BOOL",
            help=f"{text} [{key}, default {str(defaults[key]).lower()}]",
        )
    parser.add_argument(
        "--assistant-args",
        dest=ASSISTANT_ARGS_KEY,
        type=comma_list,
        metavar="A,B,...",
        help=f"arguments of --assistant-command, comma-separated [{ASSISTANT_ARGS_KEY}, "
        f"default {','.join(defaults[ASSISTANT_ARGS_KEY])!r}]",
    )
    parser.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any setting by its dotted key, e.g. --set session.sweep_interval=10s (repeatable)",
    )
    return parser


def comma_list(text: str) -> list[str]:
    """`a,b,"c, d"` -> ["a", "b", "c, d"] (CSV rules: the seed's string-slice flags); "" is no items."""
    rows = list(csv.reader([text])) if text else []
    return rows[0] if rows else []


def flags_from(args: argparse.Namespace) -> dict[str, object]:
    """Dotted key -> value for every setting given on the command line; a named flag beats --set."""
    flags: dict[str, object] = {}
    for setting in args.settings:
        key, sep, value = setting.partition("=")
        if not sep:
            raise ConfigError([f"--set {setting!r}: expected KEY=VALUE, e.g. --set session.timeout=45m"])
        flags[key.strip()] = value
    named = [*SETTING_FLAGS, *ASSISTANT_FLAGS, *ASSISTANT_BOOL_FLAGS]
    for key in [key for _flag, key, _text in named] + [TCP_FLAG_KEY, ASSISTANT_ARGS_KEY]:
        if (value := getattr(args, key)) is not None:
            flags[key] = value
    return flags


@dataclass(frozen=True)
class Run:
    """One prepared run of the host: what supervisord is started with."""

    run_dir: Path
    config_path: Path
    supervisord_conf: Path
    environment: dict[str, str]

    def supervisord_argv(self) -> list[str]:
        return [sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(self.supervisord_conf)]

    def supervisorctl(self, *command: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "supervisor.supervisorctl", "-c", str(self.supervisord_conf), *command],
            capture_output=True,
            text=True,
            timeout=SUPERVISORCTL_TIMEOUT,
        )


class HostAlreadyRunning(RuntimeError):
    pass


def _make_dir(path: Path, mode: int) -> None:
    path.mkdir(mode=mode, parents=True, exist_ok=True)
    os.chmod(path, mode)  # mkdir's mode is cut by the umask, and an existing directory keeps its own


def _supervisor_answers(socket_path: Path) -> bool:
    if not socket_path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2.0)
        try:
            probe.connect(str(socket_path))
        except OSError:
            return False  # a stale socket from a host that died: supervisord replaces it
    return True


def _current_user() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:  # a uid without a passwd entry (some containers)
        return str(os.getuid())


def render_supervisord_conf(template: str, values: Mapping[str, str]) -> str:
    """The template with every `%(ENV_BAAAHT_...)s` replaced by its value."""

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            raise KeyError(f"{SUPERVISORD_CONF} uses %(ENV_{name})s, which the launcher does not set")
        return values[name].replace("%", "%%")  # supervisord expands what is left

    return _PLACEHOLDER.sub(substitute, template)


def without_passphrase(config: Config) -> str:
    """The command prefix of every program but the credential service: supervisord hands each child its
    own environment, so the master key's passphrase variable (credentials.passphrase_env) is removed
    from theirs by `env -u` as they start (it is never written to a file)."""
    name = config.credentials.passphrase_env
    return f"{ENV_COMMAND} -u {shlex.quote(name)} " if name else ""


def prepare_run(config: Config, sources: Mapping[str, str], environ: Mapping[str, str] = os.environ) -> Run:
    """Create the directories and write everything supervisord and the children read."""
    run_dir = Path(config.bus.run_dir)
    _make_dir(Path(config.data_dir), DATA_DIR_MODE)
    _make_dir(run_dir, RUN_DIR_MODE)
    _make_dir(run_dir / LOG_DIR, RUN_DIR_MODE)
    if _supervisor_answers(run_dir / SUPERVISOR_SOCKET):
        raise HostAlreadyRunning(
            f"a host is already running on {run_dir} (supervisorctl -c {run_dir / SUPERVISORD_CONF})"
        )
    config_path = write_effective_config(config, sources, run_dir)
    settings = {
        "BAAAHT_PYTHON": sys.executable,
        "BAAAHT_CONFIG": str(config_path),
        "BAAAHT_RUN_DIR": str(run_dir),
        "BAAAHT_USER": _current_user(),
        "BAAAHT_WITHOUT_PASSPHRASE": without_passphrase(config),
    }
    template = resources.files(__package__).joinpath(SUPERVISORD_CONF).read_text()
    password = secrets.token_urlsafe(24)
    rendered = render_supervisord_conf(template, {**settings, "BAAAHT_SUPERVISOR_PASSWORD": password})
    supervisord_conf = run_dir / SUPERVISORD_CONF
    write_private_file(supervisord_conf, rendered.encode())
    # The children load the effective config only: an ORCHESTRATOR_ variable left in their
    # environment would override a flag given here (environment beats file).
    environment = {name: value for name, value in environ.items() if not name.startswith(ENV_PREFIX)}
    environment.update(settings, PYTHONUNBUFFERED="1")
    return Run(run_dir, config_path, supervisord_conf, environment)


def with_default_agent_image(config: Config, sources: dict[str, str]) -> tuple[Config, dict[str, str]]:
    """`container.agent_image` left unset means the agent image of this checkout (`make run` builds it);
    the orchestrator image sets it to the agent image built with it."""
    if config.container.agent_image or (image := agent_images.checkout_agent_image()) is None:
        return config, sources
    container = msgspec.structs.replace(config.container, agent_image=image)
    sources = {**sources, "container.agent_image": "the agent image of this checkout (make images)"}
    return msgspec.structs.replace(config, container=container), sources


def lock_data_dir(config: Config) -> DataDirLock:
    data_dir = Path(config.data_dir)
    _make_dir(data_dir, DATA_DIR_MODE)
    return DataDirLock.acquire(data_dir, Path(config.bus.run_dir))


class Reloader:
    """SIGHUP's work: resolve the configuration again as at start, report what would need a restart,
    and pass the signal on to the services that reload."""

    def __init__(self, run: Run, resolve: Callable[[], tuple[Config, dict[str, str]]], running: Config):
        self.run = run
        self.resolve = resolve
        self.running = dump_flat(running)

    def reload(self) -> None:
        log.info("SIGHUP: reloading", extra={"programs": list(RELOAD_ON_SIGHUP)})
        try:
            config, _sources = self.resolve()
        except ConfigError as error:
            log.error(
                "the configuration is refused; the host keeps its own", extra={"problems": error.problems}
            )
        else:
            for key, value in sorted(dump_flat(config).items()):
                if value != self.running[key]:
                    log.warning(
                        "changed; takes effect at the next restart of the host",
                        extra={"key": key, "running": self.running[key], "configured": value},
                    )
        try:
            result = self.run.supervisorctl("signal", "HUP", *RELOAD_ON_SIGHUP)
        except subprocess.TimeoutExpired:
            log.error(
                "supervisord did not answer; SIGHUP not passed on", extra={"programs": list(RELOAD_ON_SIGHUP)}
            )
            return
        if result.returncode != 0:
            log.error("passing SIGHUP on failed", extra={"output": (result.stdout + result.stderr).strip()})


class Supervision:
    """The launcher's life once the host runs: supervisord as its child, signals turned into actions."""

    def __init__(self, reloader: Reloader):
        self.reloader = reloader
        self.supervisor: subprocess.Popen | None = None
        self.stop_signal: int | None = None
        self.reload_requested = False

    def install_signal_handlers(self) -> None:
        """Before supervisord starts: a stop asked for while it starts is passed on once it runs."""
        signal.signal(signal.SIGTERM, self._stop)
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            signal.signal(signal.SIGINT, self._stop)
        signal.signal(signal.SIGHUP, self._request_reload)

    def _stop(self, signum: int, _frame) -> None:
        self.stop_signal = signum
        if self.supervisor is not None:
            self.supervisor.send_signal(signal.SIGTERM)

    def _request_reload(self, _signum: int, _frame) -> None:
        self.reload_requested = True  # done on the main loop: not in a signal handler

    def run(self, supervisor: subprocess.Popen) -> int:
        """Wait for supervisord to exit (reloading when asked); its exit status, as a shell reports it."""
        self.supervisor = supervisor
        if self.stop_signal is not None:
            supervisor.send_signal(signal.SIGTERM)
        while True:
            try:
                status = supervisor.wait(timeout=WAIT_INTERVAL)
            except subprocess.TimeoutExpired:
                if self.reload_requested and self.stop_signal is None:
                    self.reload_requested = False
                    self.reloader.reload()
                continue
            return status if status >= 0 else 128 - status


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    environ = dict(os.environ)  # a reload resolves the configuration from what the launcher started with

    def resolve() -> tuple[Config, dict[str, str]]:
        return with_default_agent_image(*load_config(args.config, environ, flags_from(args)))

    try:
        config, sources = resolve()
    except ConfigError as error:
        sys.exit(f"baaaht-orchestrator: the configuration is refused:\n{error}")
    setup_logging(config.log, "launcher")
    try:
        lock = lock_data_dir(config)
    except (OSError, DataDirInUse) as error:
        sys.exit(f"baaaht-orchestrator: cannot start: {error}")
    try:
        run = prepare_run(config, sources, environ)
    except (OSError, HostAlreadyRunning) as error:
        sys.exit(f"baaaht-orchestrator: cannot prepare the run: {error}")
    supervision = Supervision(Reloader(run, resolve, config))
    supervision.install_signal_handlers()
    log.info(
        "starting supervisord",
        extra={
            "run_dir": str(run.run_dir),
            "config": str(run.config_path),
            "supervisord": str(run.supervisord_conf),
            "pid": os.getpid(),
        },
    )
    # supervisord inherits the data directory's lock: it stays held while either process lives.
    supervisor = subprocess.Popen(
        run.supervisord_argv(), env=run.environment, pass_fds=(lock.fd,), start_new_session=True
    )
    status = supervision.run(supervisor)
    log.info("supervisord exited", extra={"status": status})
    sys.exit(status)


if __name__ == "__main__":
    main()
