"""Who is calling the proxy: the kernel's peer credentials on its unix socket, never a header.

The connecting process's pid (SO_PEERCRED) names its container once per connection, at its first
call (`container_of_pid`: any process of the container is the same caller), and only while that
process still runs: the kernel's pidfd of it (SO_PEERPIDFD, Linux 6.5) says so after /proc was read.
A connection whose process has exited is nobody's: its pid may by then be a process of another
container (pid_max can be 32768), which must not lend it its session. The answer is then tied to the
connection.
The container's identity file is looked at (stat) on every call, so a container the container
manager revoked (its file removed) is refused from its next call on; it is read again only when it
changed (the store replaces a file, never rewrites it: a new file is a new inode), which saves the
read and decode (~40 us) on the path of every call.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import signal
import socket
import struct
from typing import Protocol

from baaaht.common.identity import AgentIdentity, IdentityStore, container_of_pid

log = logging.getLogger("baaaht.egress")

_UCRED = struct.Struct("3i")  # pid, uid, gid
SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)  # Linux's number; Python 3.11 does not name it


def peer_pid(sock: socket.socket) -> int:
    pid, _uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return pid


class Callers(Protocol):
    def container_of(self, pid: int) -> str | None: ...

    def identity(self, container_id: str) -> AgentIdentity | None: ...


def container_of_peer(callers: Callers, sock: socket.socket) -> str | None:
    """The container of the process that connected `sock`, or None once that process has exited."""
    pid = peer_pid(sock)
    try:
        pidfd = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError as error:
        if error.errno == errno.ENOPROTOOPT:  # a kernel before 6.5: the pid alone
            _warn_pid_alone()
            return callers.container_of(pid)
        return None
    try:
        container = callers.container_of(pid)
        return container if _running(pidfd) else None  # asked after the read: it was that process's pid
    finally:
        os.close(pidfd)


@functools.cache
def _warn_pid_alone() -> None:
    """Once: the operator should know that a connection may outlive its process and its pid be reused."""
    log.warning(
        "this kernel has no SO_PEERPIDFD (Linux 6.5+): an agent connection is judged by its process's pid"
        " alone, which another process may have taken once that one exited"
    )


def _running(pidfd: int) -> bool:
    try:
        signal.pidfd_send_signal(pidfd, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another uid's process: it runs
        pass
    return True


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
