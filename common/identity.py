"""Who an agent connection is: the record the container manager issues for a container it started, and
how a process on the host finds the container a connecting pid lives in.

The kernel's peer credentials on a unix socket carry the connecting process's host pid, and
`/proc/<pid>/cgroup` names its container; the broker (and the egress proxy) read both when a connection
is made, never anything the agent sends. The container manager (the only process that talks to the
engine) writes an `AgentIdentity` per agent container into a host-only directory under the run
directory, atomically, before the container starts, and removes it when the container stops, is
removed or its session closes. Files, not a table in the broker: a broker restart loses nothing, and
a connection's identity is looked up once, when the connection is made (see docs/IDENTITY.md).
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from typing import Annotated, Iterator

import msgspec
from msgspec import Meta

IDENTITY_DIR = "identities"  # under the run directory; never mounted into a container

# A full engine container id: 64 lower-case hex digits.
CONTAINER_ID_PATTERN = r"^[0-9a-f]{64}$"
ContainerId = Annotated[str, Meta(pattern=CONTAINER_ID_PATTERN)]

# cgroup v1 (`.../docker/<id>`) and v2 with the systemd driver (`.../docker-<id>.scope`).
_CGROUP_CONTAINER = re.compile(r"(?:/docker/|/docker-)([0-9a-f]{64})(?:\.scope)?(?:/|$)", re.MULTILINE)


class AgentIdentity(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """What the orchestrator says a container is. Written only by the container manager."""

    container_id: ContainerId
    session_id: str
    role: str  # agent, assistant or worker: the rows of bus/authorize.py
    install_id: str
    issued_at: float  # Unix time


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(AgentIdentity).decode


class IdentityStore:
    """The directory of identity files: one `<container id>.json` each, mode 0600, written atomically."""

    def __init__(self, run_dir: str) -> None:
        self.directory = Path(run_dir) / IDENTITY_DIR

    def put(self, identity: AgentIdentity) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        final = self._path(identity.container_id)
        # One partial file per writer: two writers of the same identity (a call and the engine's event
        # follower) must not rename each other's file away.
        partial = final.with_suffix(f".{os.getpid()}.{threading.get_ident()}.partial")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, _encode(identity))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(partial, final)

    def get(self, container_id: str) -> AgentIdentity | None:
        """The container's identity, or None when it has none (never issued, or revoked)."""
        path = self.path(container_id)
        if path is None:
            return None
        try:
            return _decode(path.read_bytes())
        except FileNotFoundError:
            return None

    def path(self, container_id: str) -> Path | None:
        """Where the container's identity file is (or would be); None for what is not a container id."""
        return self._path(container_id) if re.match(CONTAINER_ID_PATTERN, container_id) else None

    def remove(self, container_id: str) -> bool:
        """Revoke: True when there was an identity to remove."""
        try:
            self._path(container_id).unlink()
            return True
        except FileNotFoundError:
            return False

    def all(self) -> Iterator[AgentIdentity]:
        for path in sorted(self.directory.glob("*.json")):
            try:
                yield _decode(path.read_bytes())
            except (FileNotFoundError, msgspec.DecodeError):
                continue  # removed meanwhile, or not ours: it grants nothing

    def _path(self, container_id: str) -> Path:
        return self.directory / f"{container_id}.json"


def container_in_cgroup(cgroup_text: str) -> str | None:
    """The container id a `/proc/<pid>/cgroup` names, or None for a process outside any container."""
    found = {m.group(1) for m in _CGROUP_CONTAINER.finditer(cgroup_text)}
    return found.pop() if len(found) == 1 else None  # two containers named: trust neither


def container_of_pid(pid: int, proc: str = "/proc") -> str | None:
    """The container a host pid runs in. Read when a connection is made, while its process is alive:
    a pid can be reused after its process exits, so the answer is tied to the connection, not the pid."""
    try:
        with open(f"{proc}/{pid}/cgroup") as f:
            return container_in_cgroup(f.read())
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
