"""Checks on container requests that the schema types cannot express; each failure names its field.

The bus decoder has already checked ids, names, roles, images (schemas/ids.py) and every one-field
range (schemas/containers.py); what is left spans several fields or needs more than a pattern.
"""

from __future__ import annotations

import re

from baaaht.bus.errors import BusError, invalid
from baaaht.schemas.containers import (
    ContainerExec,
    ContainerLogs,
    ContainerSpec,
)
from baaaht.services.containers.ownership import RESERVED_LABEL_PREFIX

# The engine's own rule for volume names. A mount's source goes into the engine API's URL path: one
# with '/' and '..' parts would reach another endpoint of the engine.
VOLUME_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")
HEALTHCHECK_KINDS = ("CMD", "CMD-SHELL", "NONE")
ENGINE_MIN_MEMORY = 6 * 1024 * 1024  # Docker refuses less


def validate_spec(spec: ContainerSpec) -> None:
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
    _validate_resources(spec)
    if spec.remove_on_stop and spec.restart_policy != "no":
        raise _field("spec.restart_policy", "must be 'no' when remove_on_stop is set", spec.restart_policy)
    if spec.restart_max_retries and spec.restart_policy != "on-failure":
        raise _field(
            "spec.restart_max_retries",
            "only applies to restart_policy 'on-failure'",
            spec.restart_max_retries,
        )
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
        if mount.propagation and mount.type != "bind":
            raise _field(f"{where}.propagation", "only applies to bind mounts", mount.propagation)
        if mount.tmpfs_size and mount.type != "tmpfs":
            raise _field(f"{where}.tmpfs_size", "only applies to tmpfs mounts", mount.tmpfs_size)


def _validate_resources(spec: ContainerSpec) -> None:
    resources = spec.resources
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


def _validate_healthcheck(spec: ContainerSpec) -> None:
    check = spec.healthcheck
    if not check.test or check.test[0] not in HEALTHCHECK_KINDS:
        raise _field(
            "spec.healthcheck.test", f"must start with one of {', '.join(HEALTHCHECK_KINDS)}", check.test
        )
    if check.test[0] != "NONE" and len(check.test) < 2:
        raise _field("spec.healthcheck.test", "needs a command after " + check.test[0], check.test)


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
    if request.until and request.since and request.until < request.since:
        raise _field("until", "must not be before since", request.until)


def _field(name: str, problem: str, value) -> BusError:
    return invalid(f"{name} {problem} (got {value!r})", field=name)
