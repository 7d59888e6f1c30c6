"""Who is calling the proxy: the kernel's peer credentials on its unix socket, never a header.

The connecting process's pid (SO_PEERCRED, read while it holds the connection) names its
container once per connection (`container_of_pid`: any process of the container is the same
caller; a pid reused after the process exits does not matter, the answer is tied to the connection).
The container's identity is read from the identity store on every call, so a container the
container manager revoked (its file removed) is refused from its next call on.
"""

from __future__ import annotations

import socket
import struct
from typing import Protocol

from baaaht.common.identity import AgentIdentity, IdentityStore, container_of_pid

_UCRED = struct.Struct("3i")  # pid, uid, gid


def peer_pid(sock: socket.socket) -> int:
    pid, _uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return pid


class Callers(Protocol):
    def container_of(self, pid: int) -> str | None: ...

    def identity(self, container_id: str) -> AgentIdentity | None: ...


class HostCallers:
    """The real lookup: /proc/<pid>/cgroup and the container manager's identity files."""

    def __init__(self, run_dir: str):
        self.store = IdentityStore(run_dir)

    def container_of(self, pid: int) -> str | None:
        return container_of_pid(pid)

    def identity(self, container_id: str) -> AgentIdentity | None:
        return self.store.get(container_id)
