"""Secure defaults and the orchestrator's own additions to a container spec (pure functions).

`harden` fills what a request left unset with the hardened default; the policy service then judges the
result. `attach_identity` adds what only the orchestrator decides, after the policy: ownership labels,
a unique name, and the agents' bus mount.
"""

from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass

import msgspec

from baaaht.schemas.config import Config
from baaaht.schemas.containers import ContainerSpec, Mount
from baaaht.services.containers.ownership import OwnerKind, owner_labels

NON_ROOT_USER = "1000:1000"
NO_NEW_PRIVILEGES = "no-new-privileges:true"
BUS_ENV = "BAAAHT_BUS"
BUS_SOCKET_NAME = "bus.sock"


@dataclass(frozen=True)
class Defaults:
    memory: int
    cpus: float
    pids: int
    user: str = NON_ROOT_USER

    @classmethod
    def from_config(cls, config: Config) -> "Defaults":
        return cls(
            memory=int(config.policy.max_memory),
            cpus=config.container.default_cpus,
            pids=config.container.default_pids,
        )


@dataclass(frozen=True)
class Identity:
    install_id: str
    session_id: str
    role: str
    kind: OwnerKind = OwnerKind.SESSION


@dataclass(frozen=True)
class AgentBus:
    """The agents' bus directory on the host, where it appears inside containers, and its group."""

    host_dir: str
    container_dir: str
    gid: int

    @property
    def address(self) -> str:
        return f"ipc://{self.container_dir}/{BUS_SOCKET_NAME}"


def harden(spec: ContainerSpec, defaults: Defaults) -> ContainerSpec:
    """The spec with every unset security-relevant field at its hardened default."""
    read_only = True if spec.read_only_rootfs is None else spec.read_only_rootfs
    mounts = list(spec.mounts)
    if read_only and not any(m.target.rstrip("/") == "/tmp" for m in mounts):
        mounts.append(Mount(type="tmpfs", target="/tmp"))
    security_opt = list(spec.security_opt)
    # An explicit `no-new-privileges:false` is an explicit choice (the policy judges it); absence is not.
    if not any(opt.split(":", 1)[0].split("=", 1)[0] == "no-new-privileges" for opt in security_opt):
        security_opt.append(NO_NEW_PRIVILEGES)
    resources = msgspec.structs.replace(
        spec.resources,
        memory=spec.resources.memory or defaults.memory,
        cpus=spec.resources.cpus or defaults.cpus,
        pids=spec.resources.pids or defaults.pids,
    )
    # Without swap the memory limit is the real limit (the engine's default would double it with swap).
    if not resources.memory_swap:
        resources = msgspec.structs.replace(resources, memory_swap=resources.memory)
    return msgspec.structs.replace(
        spec,
        user=spec.user or defaults.user,
        cap_drop=list(spec.cap_drop) or ([] if spec.privileged else ["ALL"]),
        security_opt=security_opt,
        read_only_rootfs=read_only,
        mounts=mounts,
        init=True if spec.init is None else spec.init,
        resources=resources,
        network_mode=spec.network_mode or ("" if spec.networks else "none"),
    )


def attach_identity(spec: ContainerSpec, identity: Identity, bus: AgentBus | None) -> ContainerSpec:
    """The spec as it goes to the engine: ownership labels (authoritative), a unique name unless the
    request chose one, and, for `bus`, the read-only bus mount, its group and its address."""
    labels = {
        **spec.labels,
        **owner_labels(identity.install_id, identity.kind, identity.session_id, identity.role),
    }
    spec = msgspec.structs.replace(
        spec, labels=labels, name=spec.name or unique_name(identity.role, identity.session_id)
    )
    if bus is None:
        return spec
    return msgspec.structs.replace(
        spec,
        mounts=[
            *spec.mounts,
            Mount(type="bind", source=bus.host_dir, target=bus.container_dir, read_only=True),
        ],
        group_add=[*spec.group_add, str(bus.gid)],
        env={**spec.env, BUS_ENV: bus.address},
    )


def agent_bus_for(agent_dir: str, container_dir: str) -> AgentBus:
    """The bus mount for the broker's agents directory (made by the broker, owned by the socket group)."""
    return AgentBus(host_dir=agent_dir, container_dir=container_dir, gid=os.stat(agent_dir).st_gid)


def unique_name(role: str, session_id: str) -> str:
    """`baaaht-<role>-<session>-<random>`: never the same twice, so a crash leaves nothing to collide with."""
    parts = [_name_part(role, 16), _name_part(session_id, 12), secrets.token_hex(4)]
    return "-".join(["baaaht", *[p for p in parts if p]])


def _name_part(text: str, limit: int) -> str:
    return re.sub(r"[^a-zA-Z0-9_.]", "", text)[:limit]
