"""The orchestrator's own additions to a container spec, after the policy (pure functions).

Defaults for what a request leaves unset come from the policy document alone (the policy service
fills them: services/policy/defaults.py). `attach_identity` adds what only the orchestrator decides:
ownership labels, a unique name, and the agents' bus mount and group, which may never grant more than
the policy would (no group 0, no writable host path).
"""

from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass

import msgspec

from baaaht.schemas.containers import ContainerSpec, Mount
from baaaht.services.containers.ownership import LABEL_AGENT_BUS, OwnerKind, owner_labels

BUS_ENV = "BAAAHT_BUS"
HEARTBEAT_ENV = "BAAAHT_HEARTBEAT_INTERVAL"  # the host's: an agent beating slower is dropped by the broker
BUS_SOCKET_NAME = "bus.sock"


@dataclass(frozen=True)
class Identity:
    install_id: str
    session_id: str
    role: str
    kind: OwnerKind = OwnerKind.SESSION


class UnsafeAddition(ValueError):
    """What the orchestrator would add to a container grants more than the policy would."""


@dataclass(frozen=True)
class AgentBus:
    """The agents' bus directory on the host, where it appears inside containers, and its group."""

    host_dir: str
    container_dir: str
    gid: int
    heartbeat_interval: float = 1.0  # seconds: bus.heartbeat_interval, which the broker holds agents to

    def __post_init__(self) -> None:
        # Added after the policy, so never judged by it: group 0 would open what root's group may touch.
        if self.gid == 0:
            raise UnsafeAddition(
                f"the agents' bus directory {self.host_dir} belongs to group 0; containers would join it "
                "(set bus.socket_group to an unprivileged group and restart the broker)"
            )

    @property
    def address(self) -> str:
        return f"ipc://{self.container_dir}/{BUS_SOCKET_NAME}"


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
    bus_mount = Mount(type="bind", source=bus.host_dir, target=bus.container_dir, read_only=True)
    return msgspec.structs.replace(
        spec,
        labels={**labels, LABEL_AGENT_BUS: "true"},
        mounts=[*spec.mounts, bus_mount],
        group_add=[*spec.group_add, str(bus.gid)],
        env={**spec.env, BUS_ENV: bus.address, HEARTBEAT_ENV: f"{bus.heartbeat_interval:g}s"},
    )


def agent_bus_for(agent_dir: str, container_dir: str, heartbeat_interval: float) -> AgentBus:
    """The bus mount for the broker's agents directory (made by the broker, owned by the socket group)."""
    return AgentBus(
        host_dir=agent_dir,
        container_dir=container_dir,
        gid=os.stat(agent_dir).st_gid,
        heartbeat_interval=heartbeat_interval,
    )


def unique_name(role: str, session_id: str) -> str:
    """`baaaht-<role>-<session>-<random>`: never the same twice, so a crash leaves nothing to collide with."""
    parts = [_name_part(role, 16), _name_part(session_id, 12), secrets.token_hex(4)]
    return "-".join(["baaaht", *[p for p in parts if p]])


def _name_part(text: str, limit: int) -> str:
    return re.sub(r"[^a-zA-Z0-9_.]", "", text)[:limit]
