"""`baaaht-orchestrator`: run the whole host (broker and services) under supervisord.

It loads the configuration (file, environment, flags), prepares the run directory
(effective config, supervisord config, logs) and the data directory, then replaces
itself with `supervisord -n` in the foreground. Ctrl-C or SIGTERM reaches supervisord,
which stops every child (TERM, then KILL after the program's stop timeout) and exits.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import pwd
import re
import secrets
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from baaaht.common.config import (
    ENV_PREFIX,
    ConfigError,
    dump_flat,
    load_config,
    write_effective_config,
    write_private_file,
)
from baaaht.common.logs import setup_logging
from baaaht.schemas.config import Config

log = logging.getLogger("baaaht.launcher")

SUPERVISORD_CONF = "supervisord.conf"
SUPERVISOR_SOCKET = "supervisor.sock"
LOG_DIR = "logs"
RUN_DIR_MODE = 0o750  # the bus sockets are for their owner and group; nobody else
DATA_DIR_MODE = 0o700
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
    parser.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any setting by its dotted key, e.g. --set session.sweep_interval=10s (repeatable)",
    )
    return parser


def flags_from(args: argparse.Namespace) -> dict[str, object]:
    """Dotted key -> value for every setting given on the command line; a named flag beats --set."""
    flags: dict[str, object] = {}
    for setting in args.settings:
        key, sep, value = setting.partition("=")
        if not sep:
            raise ConfigError([f"--set {setting!r}: expected KEY=VALUE, e.g. --set session.timeout=45m"])
        flags[key.strip()] = value
    for key in [key for _flag, key, _text in SETTING_FLAGS] + [TCP_FLAG_KEY]:
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


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        config, sources = load_config(args.config, os.environ, flags_from(args))
    except ConfigError as error:
        sys.exit(f"baaaht-orchestrator: the configuration is refused:\n{error}")
    setup_logging(config.log, "launcher")
    try:
        run = prepare_run(config, sources)
    except (OSError, HostAlreadyRunning) as error:
        sys.exit(f"baaaht-orchestrator: cannot prepare the run: {error}")
    log.info(
        "starting supervisord",
        extra={
            "run_dir": str(run.run_dir),
            "config": str(run.config_path),
            "supervisord": str(run.supervisord_conf),
        },
    )
    logging.shutdown()
    os.execve(sys.executable, run.supervisord_argv(), run.environment)


if __name__ == "__main__":
    main()
