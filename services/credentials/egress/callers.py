"""Who is calling the proxy: the kernel's peer credentials on its unix socket, never a header.

The connecting process's pid (SO_PEERCRED, read while it holds the connection) names its
container once per connection (`container_of_pid`: any process of the container is the same
caller; a pid reused after the process exits does not matter, the answer is tied to the connection).
The container's identity file is looked at (stat) on every call, so a container the container
manager revoked (its file removed) is refused from its next call on; it is read again only when it
changed (the store replaces a file, never rewrites it: a new file is a new inode), which saves the
read and decode (~40 us) on the path of every call.
"""

from __future__ import annotations

import os
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


MAX_KNOWN = 4096  # identities kept read; past it the cache starts again


class HostCallers:
    """The real lookup: /proc/<pid>/cgroup and the container manager's identity files."""

    def __init__(self, run_dir: str):
        self.store = IdentityStore(run_dir)
        self._known: dict[str, tuple[tuple[int, int, int], AgentIdentity | None]] = {}

    def container_of(self, pid: int) -> str | None:
        return container_of_pid(pid)

    def identity(self, container_id: str) -> AgentIdentity | None:
        path = self.store.path(container_id)
        if path is None:
            return None
        try:
            status = os.stat(path)
        except FileNotFoundError:
            self._known.pop(container_id, None)
            return None
        version = (status.st_ino, status.st_size, status.st_mtime_ns)
        known = self._known.get(container_id)
        if known is not None and known[0] == version:
            return known[1]
        if len(self._known) >= MAX_KNOWN:
            self._known.clear()
        identity = self.store.get(container_id)
        self._known[container_id] = (version, identity)
        return identity
