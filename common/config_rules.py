"""Which configuration values are allowed, beyond having the right type.

Ranges (ports, positive limits and intervals), names that must exist (runtimes, groups)
and pairs that only make sense together. Each rule says what is expected, so that the
error a person sees tells them what to write instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from importlib.metadata import entry_points
from typing import Any

from baaaht.common import socket_group
from baaaht.common.endpoints import Endpoints, ipc_path
from baaaht.schemas.config import BusConfig, Duration, Size

RUNTIME_ENTRY_POINTS = "baaaht.runtimes"
BUILTIN_RUNTIMES = ("auto", "docker", "apple")
MIN_WORKSPACE_SIZE = 16 * 1024 * 1024
MAX_IPC_PATH = 107  # bytes in a unix socket path (sun_path, less its terminating NUL)


def _known_runtimes() -> list[str]:
    registered = sorted({entry.name for entry in entry_points(group=RUNTIME_ENTRY_POINTS)})
    return [*BUILTIN_RUNTIMES, *(name for name in registered if name not in BUILTIN_RUNTIMES)]


def _is_port(value: int) -> bool:
    return 1 <= value <= 65535


def _is_positive(value: float) -> bool:
    return value > 0


def _is_not_empty(value: str) -> bool:
    return bool(value.strip())


def _longest_ipc_suffix() -> int:
    """Bytes the longest ipc:// socket path adds to the run directory's path."""
    endpoints = Endpoints.for_config(BusConfig(run_dir="/"))
    return (
        max(len(ipc_path(endpoint)) for endpoint in (endpoints.services, endpoints.events, endpoints.agents))
        - 1
    )


MAX_RUN_DIR = MAX_IPC_PATH - _longest_ipc_suffix()


def _is_run_dir(value: str) -> bool:
    return _is_not_empty(value) and len(os.fsencode(value)) <= MAX_RUN_DIR


_DOCKER_SCHEMES = ("unix://", "tcp://", "ssh://", "http://", "https://")

# key -> (check, the problem when it fails). Durations and sizes not listed must be above zero.
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "data_dir": (_is_not_empty, "is empty (expected a directory path)"),
    "bus.run_dir": (
        _is_run_dir,
        "is empty or too long (expected a directory path short enough for its ipc:// sockets, "
        f"at most {MAX_RUN_DIR} bytes)",
    ),
    "bus.tcp_host": (_is_not_empty, "is empty (expected a host name or address to bind)"),
    "bus.tcp_port": (_is_port, "is out of range (expected a port from 1 to 65535)"),
    "bus.heartbeat_liveness": (_is_positive, "is out of range (expected at least 1 missed heartbeat)"),
    "bus.event_history": (_is_positive, "is out of range (expected at least 1 event)"),
    "runtime.max_concurrent_ops": (_is_positive, "is out of range (expected at least 1)"),
    "docker.host": (
        lambda url: url.startswith(_DOCKER_SCHEMES),
        f"is not a Docker URL (expected one starting {', '.join(_DOCKER_SCHEMES)})",
    ),
    "session.max_sessions": (_is_positive, "is out of range (expected at least 1)"),
    "policy.max_containers": (_is_positive, "is out of range (expected at least 1)"),
    "container.orphan_grace": (lambda grace: grace >= 0, "is out of range (expected 0s or more)"),
    "workspace.size": (
        lambda size: size >= MIN_WORKSPACE_SIZE,
        "is too small (expected at least 16MiB, room for an ext4 filesystem and its journal)",
    ),
    "pool.size": (lambda n: n >= 0, "is out of range (expected 0, no pool, or more)"),
    "pool.max": (lambda n: n >= 0, "is out of range (expected 0 or more containers)"),
    "pool.roles": (
        lambda roles: set(roles) <= {"worker"},
        "names a role the pool cannot give (expected worker: pooled containers run baaaht-agent worker)",
    ),
    **{
        f"limits.{key}": (_is_positive, f"is out of range (expected at least 1 {what})")
        for key, what in (
            ("agent_in_flight", "request"),
            ("host_in_flight", "request"),
            ("queued_per_caller", "call"),
            ("agent_running_per_caller", "call"),
            ("agent_event_burst", "event"),
            ("agent_event_history", "event"),
            ("session_messages_per_minute", "message"),
            ("session_cancels_per_minute", "cancel"),
            ("session_tasks_per_minute", "task"),
            ("agent_replay_bytes_per_second", "byte"),
        )
    },
    "limits.agent_events_per_second": (_is_positive, "is out of range (expected a rate above zero)"),
    "scheduler.session_max_running": (lambda n: n >= 0, "is out of range (expected 0, none, or more)"),
    "scheduler.session_max_unfinished": (lambda n: n >= 0, "is out of range (expected 0, none, or more)"),
    "scheduler.session_rate": (lambda rate: rate >= 0, "is out of range (expected 0, none, or more)"),
    "scheduler.queue_max_running": (
        lambda limits: all(n >= 0 for n in limits.values()),
        "has a negative limit (expected queue: 0, none, or more)",
    ),
    "scheduler.queue_rate": (
        lambda rates: all(rate >= 0 for rate in rates.values()),
        "has a negative rate (expected queue: starts per second, 0 for none)",
    ),
    "egress.routes": (
        lambda routes: len({route.name for route in routes}) == len(routes),
        "names a route twice (expected unique route names)",
    ),
    "egress.deny_paths": (
        lambda paths: all(path.startswith("/") for path in paths),
        "holds a path not starting with '/' (expected path prefixes)",
    ),
    "assistant.command": (_is_not_empty, "is empty (expected the program the assistant container runs)"),
    "assistant.workdir": (
        lambda path: not path or path.startswith("/"),
        "is not an absolute path (expected a directory inside the container, or empty for the image's)",
    ),
    "assistant.model": (_is_not_empty, "is empty (expected the provider's model name)"),
    **{
        f"assistant.{key}": (_is_positive, "is out of range (expected at least 1)")
        for key in ("max_turns", "max_tool_calls", "context_budget")
    },
    "egress.session_requests": (lambda cap: cap >= 0, "is out of range (expected 0, no cap, or more)"),
    "egress.session_tokens": (lambda cap: cap >= 0, "is out of range (expected 0, no cap, or more)"),
    "egress.refusals_per_minute": (
        lambda rate: rate >= 0,
        "is out of range (expected 0, only summed up, or more)",
    ),
}


# An agent's byte budgets and the largest message each must let through: (budget, size, what fails below it).
_AGENT_BYTE_FLOORS = (
    ("limits.agent_event_burst_bytes", "bus.max_event_size", "publish an event that large"),
    ("limits.agent_bytes_in_flight", "bus.max_message_size", "send a message that large"),
    ("limits.session_message_bytes_per_minute", "session.max_message_size", "add a message that large"),
    # a replay page holds one event whatever its size: below this, one kept event of the largest size
    # left a debt longer than a second, and a subscription's catch-up waits at most its call timeout
    (
        "limits.agent_replay_bytes_per_second",
        "bus.max_event_size",
        "be replayed an event that large within a second",
    ),
)


def problems_in(values: Mapping[str, Any], types: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(key, problem) for every value that is not allowed; `types` gives each key's type."""
    failed: list[tuple[str, str]] = []
    for key, value in values.items():
        if key in RULES:
            check, problem = RULES[key]
        elif types[key] in (Duration, Size):
            check, problem = (
                _is_positive,
                f"is out of range (expected a {types[key].__name__.lower()} above zero)",
            )
        else:
            continue
        if not check(value):
            failed.append((key, problem))
    runtimes = _known_runtimes()
    if values.get("runtime.type", "auto") not in runtimes:
        failed.append(
            (
                "runtime.type",
                f"is not a known runtime (expected {', '.join(runtimes)}; see {RUNTIME_ENTRY_POINTS})",
            )
        )
    if "bus.socket_group" in values and (problem := socket_group.problem_with(values["bus.socket_group"])):
        failed.append(("bus.socket_group", problem))
    for key, largest_key, never in _AGENT_BYTE_FLOORS:
        budget, largest = values.get(key), values.get(largest_key)
        if budget is not None and largest is not None and budget < largest:
            failed.append((key, f"is below {largest_key} ({largest} bytes): an agent could never {never}"))
    size, most = values.get("pool.size"), values.get("pool.max")
    if size is not None and most is not None and size > most:
        failed.append(("pool.size", f"is above pool.max ({most}): the pool's quota would refuse its size"))
    if bool(values.get("docker.tls_cert")) != bool(values.get("docker.tls_key")):
        key = "docker.tls_cert" if values.get("docker.tls_cert") else "docker.tls_key"
        failed.append((key, "is set alone (expected docker.tls_cert and docker.tls_key together)"))
    failed += _credential_problems(values)
    failed += _assistant_problems(values)
    return failed


def _assistant_problems(values: Mapping[str, Any]) -> list[tuple[str, str]]:
    """A writable root filesystem is a development exception: only with dev mode, which needs its source."""
    failed = []
    dev_mode = values.get("assistant.dev_mode", False)
    if not values.get("assistant.readonly_rootfs", True) and not dev_mode:
        failed.append(
            (
                "assistant.readonly_rootfs",
                "is refused without assistant.dev_mode (a writable root filesystem is a development-only "
                "exception: set assistant.dev_mode too, or leave readonly_rootfs true)",
            )
        )
    if dev_mode and not values.get("assistant.dev_source"):
        failed.append(
            (
                "assistant.dev_mode",
                "needs assistant.dev_source (expected the host directory to bind-mount)",
            )
        )
    return failed


def _inside(path: str, directory: str) -> bool:
    path, directory = os.path.normpath(path), os.path.normpath(directory)
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def _credential_problems(values: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The master key never lives beside the data it opens: a copy of data_dir must not open itself."""
    failed = []
    data_dir = values.get("data_dir", "")
    if values.get("credentials.passphrase_file") and values.get("credentials.passphrase_env"):
        failed.append(
            ("credentials.passphrase_env", "is set with credentials.passphrase_file (expected one of them)")
        )
    if values.get("credentials.passphrase_env", "").startswith("ORCHESTRATOR_"):
        failed.append(
            (
                "credentials.passphrase_env",
                "names an ORCHESTRATOR_ variable (the launcher keeps those from services)",
            )
        )
    passphrase = values.get("credentials.passphrase_file") or values.get("credentials.passphrase_env")
    keys = ["credentials.passphrase_file"] if passphrase else ["credentials.master_key_file"]
    for key in keys:
        path = values.get(key, "")
        if key == "credentials.master_key_file" and not path.strip():
            failed.append((key, "is empty (expected a file path outside data_dir, or a passphrase source)"))
        elif path and data_dir and _inside(path, data_dir):
            failed.append((key, f"is inside data_dir {data_dir} (expected a path outside it)"))
    return failed
