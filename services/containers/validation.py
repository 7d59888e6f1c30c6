"""Checks on container requests that the schema types cannot express; each failure names its field."""

from __future__ import annotations

import re

from baaaht.bus.errors import BusError, invalid
from baaaht.schemas.containers import (
    ContainerCreate,
    ContainerExec,
    ContainerHealthWait,
    ContainerLogs,
    ContainerSpec,
    ContainerStatsStream,
)
from baaaht.services.containers.ownership import RESERVED_LABEL_PREFIX

NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$")
# The engine's own rule for volume names. Names, ids and images go into the engine API's URL path, so
# each is checked: one with '/' and '..' parts would reach another endpoint of the engine.
VOLUME_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")
ROLE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
SESSION_ID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
HEALTHCHECK_KINDS = ("CMD", "CMD-SHELL", "NONE")
ENGINE_MIN_MEMORY = 6 * 1024 * 1024  # Docker refuses less
ENGINE_STATS_PERIOD = 1.0  # seconds between the engine's stats samples


def validate_create(request: ContainerCreate) -> None:
    validate_session_id(request.session_id)
    if not ROLE.match(request.role):
        raise invalid(
            "role must be lower-case letters, digits, '_' or '-' (max 32)", field="role", value=request.role
        )
    validate_spec(request.spec)


def validate_session_id(session_id: str) -> None:
    if not SESSION_ID.match(session_id):
        raise invalid(
            "session_id must be 1-128 letters, digits, '_', '.' or '-'", field="session_id", value=session_id
        )


def validate_ref(ref: str) -> None:
    if not NAME.match(ref):
        raise invalid(
            f"id must name a container: an id, an id prefix or a name (got {ref!r})", field="id", value=ref
        )


def validate_image(image: str, field: str = "image") -> None:
    if not image or any(c.isspace() for c in image) or any(p in (".", "..") for p in image.split("/")):
        raise _field(field, "must be a non-empty image reference without spaces or '.' and '..' parts", image)


def validate_spec(spec: ContainerSpec) -> None:
    validate_image(spec.image, "spec.image")
    if spec.name and not NAME.match(spec.name):
        raise _field("spec.name", "must match [a-zA-Z0-9][a-zA-Z0-9_.-]* (max 128)", spec.name)
    for key in spec.labels:
        if not key:
            raise _field("spec.labels", "label keys must not be empty", key)
        if key.startswith(RESERVED_LABEL_PREFIX):
            raise _field(
                "spec.labels",
                f"keys starting with {RESERVED_LABEL_PREFIX!r} are set by the orchestrator",
                key,
            )
    validate_env("spec.env", spec.env)
    _validate_mounts(spec)
    for index, port in enumerate(spec.ports):
        if not 1 <= port.container_port <= 65535:
            raise _field(f"spec.ports[{index}].container_port", "must be 1-65535", port.container_port)
        if not 0 <= port.host_port <= 65535:
            raise _field(
                f"spec.ports[{index}].host_port", "must be 0-65535 (0: any free port)", port.host_port
            )
    _validate_resources(spec)
    if spec.remove_on_stop and spec.restart_policy != "no":
        raise _field("spec.restart_policy", "must be 'no' when remove_on_stop is set", spec.restart_policy)
    if spec.restart_max_retries and spec.restart_policy != "on-failure":
        raise _field(
            "spec.restart_max_retries",
            "only applies to restart_policy 'on-failure'",
            spec.restart_max_retries,
        )
    if spec.restart_max_retries < 0:
        raise _field("spec.restart_max_retries", "must not be negative", spec.restart_max_retries)
    if any(not network for network in spec.networks):
        raise _field("spec.networks", "network names must not be empty", spec.networks)
    if spec.healthcheck is not None:
        _validate_healthcheck(spec)


def _validate_mounts(spec: ContainerSpec) -> None:
    targets = set()
    for index, mount in enumerate(spec.mounts):
        where = f"spec.mounts[{index}]"
        if not mount.target.startswith("/"):
            raise _field(f"{where}.target", "must be an absolute path", mount.target)
        if mount.target.rstrip("/") in targets:
            raise _field(f"{where}.target", "is mounted twice", mount.target)
        targets.add(mount.target.rstrip("/"))
        if mount.type == "bind" and not mount.source.startswith("/"):
            raise _field(f"{where}.source", "a bind mount needs an absolute host path", mount.source)
        if mount.type == "volume" and mount.source and not VOLUME_NAME.match(mount.source):
            raise _field(
                f"{where}.source", "a volume name must match [a-zA-Z0-9][a-zA-Z0-9_.-]*", mount.source
            )
        if mount.type == "tmpfs" and mount.source:
            raise _field(f"{where}.source", "a tmpfs mount has no source", mount.source)
        if mount.tmpfs_size and mount.type != "tmpfs":
            raise _field(f"{where}.tmpfs_size", "only applies to tmpfs mounts", mount.tmpfs_size)
        if mount.tmpfs_size < 0:
            raise _field(f"{where}.tmpfs_size", "must not be negative", mount.tmpfs_size)


def _validate_resources(spec: ContainerSpec) -> None:
    resources = spec.resources
    if resources.cpus < 0:
        raise _field("spec.resources.cpus", "must not be negative", resources.cpus)
    if resources.memory < 0 or 0 < resources.memory < ENGINE_MIN_MEMORY:
        raise _field(
            "spec.resources.memory",
            f"must be 0 (default) or at least {ENGINE_MIN_MEMORY} bytes",
            resources.memory,
        )
    if resources.memory_swap and resources.memory_swap != -1 and resources.memory_swap < resources.memory:
        raise _field(
            "spec.resources.memory_swap", "must be -1 (unlimited) or at least memory", resources.memory_swap
        )
    if resources.pids < 0:
        raise _field("spec.resources.pids", "must not be negative", resources.pids)


def _validate_healthcheck(spec: ContainerSpec) -> None:
    check = spec.healthcheck
    if not check.test or check.test[0] not in HEALTHCHECK_KINDS:
        raise _field(
            "spec.healthcheck.test", f"must start with one of {', '.join(HEALTHCHECK_KINDS)}", check.test
        )
    if check.test[0] != "NONE" and len(check.test) < 2:
        raise _field("spec.healthcheck.test", "needs a command after " + check.test[0], check.test)
    for name in ("interval", "timeout"):
        if getattr(check, name) <= 0:
            raise _field(f"spec.healthcheck.{name}", "must be positive", getattr(check, name))
    if check.start_period < 0:
        raise _field("spec.healthcheck.start_period", "must not be negative", check.start_period)
    if check.retries < 1:
        raise _field("spec.healthcheck.retries", "must be at least 1", check.retries)


def validate_env(field: str, env: dict[str, str]) -> None:
    for key, value in env.items():
        if not key or "=" in key or "\0" in key or "\0" in value:
            raise _field(field, "names must be non-empty without '=' and values without NUL bytes", key)


def validate_exec(request: ContainerExec) -> None:
    if not request.command or not request.command[0]:
        raise invalid("command must name a program to run", field="command")
    validate_env("env", request.env)


def validate_logs(request: ContainerLogs) -> None:
    if not (request.stdout or request.stderr):
        raise invalid("at least one of stdout and stderr must be requested", field="stdout")
    if request.tail < -1:
        raise _field("tail", "must be -1 (all) or a line count", request.tail)
    if request.since < 0 or request.until < 0:
        raise invalid("since and until are unix times (0: unbounded)", field="since")
    if request.until and request.since and request.until < request.since:
        raise _field("until", "must not be before since", request.until)


def validate_stats_stream(request: ContainerStatsStream) -> None:
    if request.interval < ENGINE_STATS_PERIOD:
        raise _field(
            "interval",
            f"must be at least {ENGINE_STATS_PERIOD:g}s: the engine takes one sample per second",
            request.interval,
        )


def validate_health_wait(request: ContainerHealthWait) -> None:
    if request.retries < 1:
        raise _field("retries", "must be at least 1", request.retries)
    if request.interval <= 0:
        raise _field("interval", "must be positive", request.interval)


def require_non_negative(name: str, value: float) -> None:
    if value < 0:
        raise _field(name, "must not be negative", value)


def _field(name: str, problem: str, value) -> BusError:
    return invalid(f"{name} {problem} (got {value!r})", field=name)
