"""What a container spec leaves unset, filled from the policy document: the one source of defaults.

The engine fills the spec once, before any rule and in every mode (`disabled` too), so
`policy.explain`, `policy.evaluate` and `container.create` all run with the same values, and the
rules then judge the filled spec: a default is the policy's own choice, so it always passes. Each
default applied is one `enforce` step of the trace.
"""

from __future__ import annotations

import re
from copy import deepcopy

from baaaht.common.policy.document import PolicyDocument
from baaaht.common.units import render_size
from baaaht.schemas.containers import ContainerSpec, Mount
from baaaht.schemas.policy import Check

NO_NEW_PRIVILEGES = "no-new-privileges"
_OPTION_SEPARATOR = re.compile(r"[:=]")  # `no-new-privileges:true`, `seccomp=unconfined`


def copy(spec: ContainerSpec) -> ContainerSpec:
    """A deep copy, so filling and enforcing never touch the caller's spec. Not a decode: the policy
    judges any spec it is given, even one the schema's field rules would refuse."""
    return deepcopy(spec)


def split_option(option: str) -> tuple[str, str]:
    """A security_opt entry's key and value: `no-new-privileges:true` -> (no-new-privileges, true)."""
    key, value = (_OPTION_SEPARATOR.split(option, maxsplit=1) + [""])[:2]
    return key, value


def fill(spec: ContainerSpec, document: PolicyDocument) -> tuple[ContainerSpec, list[Check]]:
    """A copy of `spec` with every unset field at the document's default, and what was filled."""
    filled = copy(spec)
    steps: list[Check] = []

    def default(rule: str, message: str) -> None:
        steps.append(Check(rule=rule, outcome="enforce", message=message))

    quotas, security, mounts = document.quotas, document.security, document.mounts
    if not filled.user:
        filled.user = security.default_user
        default("security.user.default", f"user is unset: {security.default_user} applies")
    resources = filled.resources
    for name, value, shown in (
        ("cpus", float(quotas.default_cpus), str(quotas.default_cpus)),
        ("memory", int(quotas.default_memory), render_size(quotas.default_memory)),
        ("pids", int(quotas.default_pids), str(quotas.default_pids)),
    ):
        if getattr(resources, name) == 0:
            setattr(resources, name, value)
            rule = "cpu" if name == "cpus" else name
            default(f"quota.{rule}.default", f"resources.{name} is unset: the default {shown} applies")
    if resources.memory_swap == 0:
        # Without swap the memory limit is the real limit (the engine's default would double it).
        resources.memory_swap = resources.memory
        default("quota.memory_swap.default", "resources.memory_swap is unset: no swap (equal to memory)")
    if filled.read_only_rootfs is None:
        filled.read_only_rootfs = True
        default("security.readonly_rootfs.required", "read_only_rootfs is unset: root filesystem read-only")
    has_tmp = any(mount.target.rstrip("/") == "/tmp" for mount in filled.mounts)
    if filled.read_only_rootfs and mounts.allow_tmpfs and not has_tmp:
        filled.mounts.append(Mount(type="tmpfs", target="/tmp"))
        default("mount.tmpfs.default", "a read-only root filesystem gets a tmpfs /tmp")
    for index, mount in enumerate(filled.mounts):
        if mount.type == "tmpfs" and mount.tmpfs_size == 0:
            mount.tmpfs_size = int(mounts.max_tmpfs_size)
            limit = render_size(mounts.max_tmpfs_size)
            default("mount.tmpfs.size", f"mounts[{index}]: tmpfs size unset: limited to {limit}")
    if filled.init is None:
        filled.init = True
        default("runtime.init.default", "init is unset: an init process reaps zombies")
    if not filled.network_mode and not filled.networks:
        filled.network_mode = "none"
        default("network.disabled", "network_mode is unset: none (no network)")
    if not any(split_option(option)[0] == NO_NEW_PRIVILEGES for option in filled.security_opt):
        filled.security_opt.append(f"{NO_NEW_PRIVILEGES}:true")
        default("security.no_new_privileges.required", "no-new-privileges added")
    if not filled.cap_drop and not filled.privileged:
        filled.cap_drop = list(security.drop_capabilities)
        default("security.capability.drop", f"cap_drop is unset: {', '.join(filled.cap_drop)} dropped")
    return filled, steps
