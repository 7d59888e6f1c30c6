"""The broker's outside world for agent identity: which container a connecting process is in, and
what the container manager says that container is.

The broker passes an adapter of this shape to nothing else; it calls it once when an agent
connection is accepted and again for `bus.agents.update`. Tests hand the broker one whose
`container_of` also reads a fake /proc (baaaht.bus.testing.broker), so host processes can play
containers; the real one reads the kernel's /proc and the identity files (common/identity.py).
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from typing import Iterator, Protocol

from baaaht.bus.connections import Credentials
from baaaht.common.identity import AgentIdentity, IdentityStore, container_of_pid

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class Identities(Protocol):
    def container_of(self, pid: int) -> str | None: ...

    def identity(self, container_id: str) -> AgentIdentity | None: ...


class ContainerIdentities:
    """pid -> container from /proc/<pid>/cgroup; container -> identity from the run directory."""

    def __init__(self, run_dir: str, proc: str = "/proc") -> None:
        self.store = IdentityStore(run_dir)
        self.proc = proc

    def container_of(self, pid: int) -> str | None:
        return container_of_pid(pid, self.proc) if pid > 0 else None

    def identity(self, container_id: str) -> AgentIdentity | None:
        return self.store.get(container_id)


@contextlib.contextmanager
def _duplicate(fd: int) -> Iterator[socket.socket | None]:
    """The socket on `fd` through a duplicate descriptor (None when it is no socket any more):
    libzmq's own descriptor is never closed or changed by the broker's thread."""
    try:
        dup = os.dup(fd)
    except OSError:
        yield None
        return
    try:
        sock = socket.socket(fileno=dup)
    except OSError:
        os.close(dup)
        yield None
        return
    with sock:
        yield sock


def credentials_of_fd(fd: int) -> Credentials | None:
    """SO_PEERCRED of a connection the broker's ZeroMQ socket accepted, with the socket's inode (uid,
    gid and pid -1 on tcp); None when the fd is no socket any more."""
    with _duplicate(fd) as sock:
        if sock is None:
            return None
        try:
            inode = os.fstat(sock.fileno()).st_ino
            if sock.family != socket.AF_UNIX:
                return Credentials(inode=inode)
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        except OSError:
            return None
        pid, uid, gid = _PEERCRED.unpack(raw)
        return Credentials(uid, gid, pid, inode)


def shut_down(fd: int, inode: int) -> bool:
    """End the connection on `fd` at once (ZeroMQ has no per-peer close on a ROUTER): shutdown(2)
    reaches the socket itself, so libzmq reads the end, closes its own descriptor and the monitor
    reports the close. Only while the fd is still the socket that was accepted (same inode): a
    descriptor the kernel has handed to something else since is left alone. True when shut down."""
    with _duplicate(fd) as sock:
        if sock is None:
            return False
        try:
            if os.fstat(sock.fileno()).st_ino != inode:
                return False
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            return False
        return True
