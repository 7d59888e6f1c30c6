"""The broker's connections, with no sockets in it: who is at the other end of each one.

A ROUTER socket hides its connections; its monitor reports each one accepted and each one
closed, by file descriptor. The broker reads the kernel's peer credentials off the fd when the
connection is accepted and, on the agent socket, the identity of the container the connecting
process lives in (bus/identities.py): once per connection, so neither a process that forks or
execs nor a pid reused after its process exits changes who a connection is. A file descriptor is
reused by the next connection once one closes, so connections are told apart by a serial number,
and a peer (routing id) belongs to the connection its messages came through.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from baaaht.bus import authorize
from baaaht.common.identity import AgentIdentity

SocketFd = tuple[int, int]  # (index of the ROUTER socket, file descriptor)


@dataclass(frozen=True, slots=True)
class Credentials:
    """The kernel's peer credentials of a unix-socket connection (-1 when unknown: tcp), and the
    socket's inode, so the broker can tell it is still the same socket behind a reused fd."""

    uid: int = -1
    gid: int = -1
    pid: int = -1
    inode: int = 0


UNKNOWN = Credentials()


@dataclass(slots=True, eq=False)
class Connection:
    serial: int
    index: int
    fd: int
    credentials: Credentials
    accepted_at: float  # Unix time, for `bus.agents.list`
    role: str
    container: str = ""  # the container the connecting process was in ("" on the services socket)
    identity: AgentIdentity | None = None
    live: bool = True  # until the monitor reports it closed
    revoked: bool = False  # its identity was withdrawn: refused, and being disconnected
    peers: set = field(default_factory=set)  # PeerKeys seen on it
    refusals_logged: set = field(default_factory=set)  # PERMISSION_DENIED messages already logged

    @property
    def session(self) -> str:
        return self.identity.session_id if self.identity is not None else ""


def agent_role(identity: AgentIdentity | None) -> str:
    """The role an identity grants: one of the agent roles, else nothing (unidentified); an identity
    file naming any other role (`service`, `operator`) grants nothing."""
    if identity is not None and identity.role in authorize.AGENT_ROLES:
        return identity.role
    return authorize.UNIDENTIFIED


def host_role(credentials: Credentials, host_uid: int) -> str:
    """The role of a services-socket connection: the host's uid (or root) is the operator; anything
    else is refused (tcp peers, with no credentials, are judged by the TCP authentication)."""
    if credentials.uid in (host_uid, 0, UNKNOWN.uid):
        return authorize.OPERATOR
    return authorize.REFUSED


class Connections:
    """Live connections by (socket, fd), and the agent connections by container."""

    def __init__(self) -> None:
        self._serials = itertools.count(1)
        self.by_fd: dict[SocketFd, Connection] = {}
        self.by_container: dict[str, set[Connection]] = {}

    def accepted(
        self,
        index: int,
        fd: int,
        credentials: Credentials,
        now_wall: float,
        role: str,
        container: str = "",
        identity: AgentIdentity | None = None,
    ) -> tuple[Connection, Connection | None]:
        """A new connection; and the one it replaces on the same fd, if its close was not reported."""
        previous = self.closed(index, fd)
        connection = Connection(
            next(self._serials), index, fd, credentials, now_wall, role, container, identity
        )
        self.by_fd[(index, fd)] = connection
        if container:
            self.by_container.setdefault(container, set()).add(connection)
        return connection, previous

    def closed(self, index: int, fd: int) -> Connection | None:
        """The connection on that fd has closed: forget it, and return it (with its peers)."""
        connection = self.by_fd.pop((index, fd), None)
        if connection is None:
            return None
        connection.live = False
        of_container = self.by_container.get(connection.container)
        if of_container is not None:
            of_container.discard(connection)
            if not of_container:
                del self.by_container[connection.container]
        return connection

    def current(self, index: int, fd: int) -> Connection | None:
        return self.by_fd.get((index, fd))

    def of_container(self, container: str) -> list[Connection]:
        return sorted(self.by_container.get(container, ()), key=lambda c: c.serial)

    @staticmethod
    def reidentify(connection: Connection, identity: AgentIdentity | None) -> bool:
        """Take up a re-read identity (a warm-pool claim gives one to a connection that had none);
        True when this revokes it: it had an identity and has none any more."""
        revoked = connection.identity is not None and identity is None
        connection.identity = identity
        connection.role = agent_role(identity)
        connection.revoked = connection.revoked or revoked
        return revoked
