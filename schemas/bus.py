"""The broker's own messages: registration, the caller stamp and `bus.*` methods."""

from __future__ import annotations

from typing import ClassVar

import msgspec

from baaaht.schemas.base import Event, Request, Response


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
