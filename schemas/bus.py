"""The broker's own messages: registration, the caller stamp and `bus.*` methods."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import msgspec
from msgspec import Meta

from baaaht.schemas.base import Event, Request, Response
from baaaht.schemas.ids import ContainerId


class Caller(msgspec.Struct, kw_only=True, omit_defaults=True, frozen=True):
    """Who sent a request, as the broker saw the connection (never as the sender claims).

    `socket` is `services` or `agents`; uid/gid/pid come from the kernel's peer
    credentials on ipc:// (-1 on tcp://). `role` is what bus/authorize.py decided the peer is; an
    agent's `session` and `container` come from its container's identity (common/identity.py)."""

    socket: str = ""
    peer: str = ""
    service: str = ""
    uid: int = -1
    gid: int = -1
    pid: int = -1
    role: str = ""
    session: str = ""
    container: str = ""
    key: str = ""  # on tcp://: the name of the CURVE key the peer authenticated with (bus.auth.keys.*)


class Register(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Body of a REGISTER frame: a service instance offers its methods."""

    service: str
    instance: str
    methods: list[str]
    schema_version: int = 1
    concurrency: int = 1
    healthy: bool = True
    reason: str = ""


class ServiceHealth(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Body of a service's HEARTBEAT: its health rides along with liveness."""

    healthy: bool = True
    reason: str = ""


class Pong(Response, kw_only=True):
    broker_pid: int
    started_at: float
    time: float
    protocol: str
    caller: Caller
    # Every peer must send a HEARTBEAT each `heartbeat_interval` seconds: after `heartbeat_liveness`
    # silent intervals the broker drops it and answers its pending calls UNAVAILABLE.
    heartbeat_interval: float = 1.0
    heartbeat_liveness: int = 3


class BusPing(Request, tag="bus.ping", kw_only=True):
    response: ClassVar[type] = Pong


class InstanceInfo(msgspec.Struct, kw_only=True):
    instance: str
    peer: str
    pid: int
    methods: list[str]
    schema_version: int
    concurrency: int
    in_flight: int
    served: int
    heartbeat_age: float
    healthy: bool
    reason: str = ""


class ServiceInfo(msgspec.Struct, kw_only=True):
    name: str
    instances: list[InstanceInfo]


class BusServicesResult(Response, kw_only=True):
    services: list[ServiceInfo]


class BusServices(Request, tag="bus.services", kw_only=True):
    response: ClassVar[type] = BusServicesResult
    service: str = ""


class PeerInfo(msgspec.Struct, kw_only=True):
    peer: str
    socket: str
    service: str
    uid: int
    gid: int
    pid: int
    last_seen_age: float
    messages: int
    malformed: int = 0  # messages from it the broker refused as malformed
    role: str = ""  # as stamped in its Caller
    session: str = ""
    container: str = ""


class BusPeersResult(Response, kw_only=True):
    peers: list[PeerInfo]


class BusPeers(Request, tag="bus.peers", kw_only=True):
    response: ClassVar[type] = BusPeersResult


class ServiceStats(msgspec.Struct, kw_only=True):
    requests: int = 0
    replies: int = 0
    errors: dict[str, int] = {}


class BusStatsReport(Response, kw_only=True):
    uptime: float
    messages_in: int
    messages_out: int
    bytes_in: int
    bytes_out: int
    errors: dict[str, int]
    malformed: int
    malformed_kinds: dict[str, int] = {}  # malformed messages by kind: not_baaaht, event_body, ...
    events_published: int
    last_event_seq: int
    per_service: dict[str, ServiceStats]
    auth_failed: dict[str, int] = {}  # refused handshakes and identities by reason (bus.auth.failed)


class BusStats(Request, tag="bus.stats", kw_only=True):
    response: ClassVar[type] = BusStatsReport


class StampedEvent(msgspec.Struct, kw_only=True, array_like=True):
    """An event as the broker keeps and replays it; `body` is the publisher's bytes."""

    seq: int
    time: float
    topic: str
    source: str
    body: msgspec.Raw


class ReplayResult(Response, kw_only=True):
    events: list[StampedEvent]
    first_seq: int
    last_seq: int
    epoch: int = 0  # as in every EventStamp: which broker's numbering these are
    # The page was cut before the matching events ran out (by `limit`, or an agent's replay budget):
    # ask again from the last event's seq.
    more: bool = False


class BusEventsReplay(Request, tag="bus.events.replay", kw_only=True):
    """Events with seq > since, oldest first, whose topic starts with one of `topics`.
    With limit 0, just the numbers: where the kept history starts and ends."""

    response: ClassVar[type] = ReplayResult

    since: int = 0
    topics: list[str] = []
    limit: int = 1000


class BrokerStarted(Event, tag="bus.started", kw_only=True):
    pid: int


class ServiceUp(Event, tag="bus.service.up", kw_only=True):
    service: str
    instance: str


class ServiceDown(Event, tag="bus.service.down", kw_only=True):
    service: str
    instance: str
    reason: str


# -- CURVE keys of peers on other hosts (bus/curve.py) --------------------------------------------

KeyName = Annotated[str, Meta(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")]
Z85Key = Annotated[str, Meta(pattern=r"^[0-9a-zA-Z.:+=^!/*?&<>()\[\]{}@%$#-]{40}$")]
# What a key makes its holder: a host role, or an agent role scoped to one session.
KeyRole = Literal["service", "operator", "agent", "assistant", "worker"]


class KeyRecord(msgspec.Struct, kw_only=True, frozen=True, omit_defaults=True):
    """A client key the operator issued: its holder authenticates with it on tcp:// as `role`."""

    name: KeyName
    public_key: Z85Key
    role: KeyRole
    session: str = ""  # for the agent roles: the one session the holder acts in
    issued_at: float  # Unix time
    expires_at: float = 0.0  # Unix time; 0: never


class BusAuthKeysIssueResult(Response, kw_only=True):
    key: KeyRecord
    server_public_key: Z85Key  # what the client checks the broker against


class BusAuthKeysIssue(Request, tag="bus.auth.keys.issue", kw_only=True):
    """Record a client's public key (the key pair is made and kept by the client: no secret
    crosses the bus). Agent roles need a session; host roles take none."""

    response: ClassVar[type] = BusAuthKeysIssueResult

    name: KeyName
    public_key: Z85Key
    role: KeyRole
    session: str = ""
    ttl: Annotated[float, Meta(ge=0)] = 0.0  # seconds until it expires; 0: never


class BusAuthKeysListResult(Response, kw_only=True):
    keys: list[KeyRecord]
    server_public_key: Z85Key


class BusAuthKeysList(Request, tag="bus.auth.keys.list", kw_only=True):
    response: ClassVar[type] = BusAuthKeysListResult


class BusAuthKeysRevokeResult(Response, kw_only=True):
    key: KeyRecord
    disconnected: int  # connections authenticated with it, closed at once


class BusAuthKeysRevoke(Request, tag="bus.auth.keys.revoke", kw_only=True):
    response: ClassVar[type] = BusAuthKeysRevokeResult

    name: KeyName


class BusAuthFailed(Event, tag="bus.auth.failed", kw_only=True):
    """A peer the broker refused: a failed handshake, an unknown, expired or revoked key. One
    event per reason per period in full; `count` > 1 sums up the ones of a period not sent alone."""

    socket: str  # services, agents or events
    reason: str  # the key of BusStatsReport.auth_failed it was counted under
    message: str
    address: str = ""  # the peer's address, when known
    key: str = ""  # the key's name, when it is a known one
    count: int = 1


class AgentInfo(msgspec.Struct, kw_only=True):
    """One peer on the agent socket, as `bus.agents.list` shows it."""

    container: str  # "" when its process is in no container
    session: str
    role: str
    peer: str
    pid: int
    connected_since: float  # Unix time its connection was accepted
    last_seen_age: float
    in_flight: int  # its calls in flight
    messages: int


class BusAgentsListResult(Response, kw_only=True):
    agents: list[AgentInfo]


class BusAgentsList(Request, tag="bus.agents.list", kw_only=True):
    response: ClassVar[type] = BusAgentsListResult


class BusAgentsUpdateResult(Response, kw_only=True):
    connections: int  # the container's connections that took up the change
    revoked: bool = False  # it has no identity any more: those connections were refused and closed
    role: str = ""  # what they are now
    session: str = ""


class BusAgentsUpdate(Request, tag="bus.agents.update", kw_only=True):
    """The container manager wrote or removed this container's identity: the broker re-reads it for
    the container's connections (none any more = revoked: refused and disconnected at once)."""

    response: ClassVar[type] = BusAgentsUpdateResult

    container_id: ContainerId


class AuthRule(msgspec.Struct, kw_only=True):
    """One role's rules for one action: patterns in order, the first match decides."""

    role: str
    action: str
    patterns: list[str]  # `pattern` allows, `!pattern` denies


class BusAuthRulesResult(Response, kw_only=True):
    rules: list[AuthRule]
    domains: dict[str, list[str]]  # service -> the topics it may publish besides its own name's


class BusAuthRules(Request, tag="bus.auth.rules", kw_only=True):
    """The broker's permission table (bus/authorize.py), as it is running."""

    response: ClassVar[type] = BusAuthRulesResult
