"""The broker's state, with no sockets in it: peers, service pools, in-flight
requests, heartbeats and the event history. Every method that depends on time
takes `now` (the broker's monotonic clock; wire deadlines are converted to it on
arrival), so liveness and expiry are tested without sleeping.
"""

from __future__ import annotations

import bisect
import collections
import heapq
import itertools
import math
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import Callable

import msgspec

from baaaht.bus import authorize
from baaaht.bus.connections import Connection
from baaaht.bus.errors import BusError
from baaaht.bus.wire import TOKEN_SIZE
from baaaht.common.rate import TokenBucket
from baaaht.schemas.bus import (
    AgentInfo,
    Caller,
    InstanceInfo,
    PeerInfo,
    Register,
    ServiceDown,
    ServiceInfo,
    ServiceStats,
    ServiceUp,
    StampedEvent,
)
from baaaht.schemas.config import LimitsConfig
from baaaht.schemas.errors import ErrorCode

PeerKey = tuple[int, bytes]  # (index of the socket it came through, routing id)

SERVICES_SOCKET = "services"
AGENTS_SOCKET = "agents"
SERVICE_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789_-")
_DEFAULT_LIMITS = LimitsConfig()


@dataclass(frozen=True, slots=True)
class Grant:
    """Who a connection was found to be beyond the socket it came through (e.g. by its CURVE key):
    its role, and what it is scoped to, stamped into its Caller."""

    role: str
    session: str = ""
    container: str = ""
    key: str = ""


@dataclass(slots=True)
class Peer:
    key: PeerKey
    socket: str
    connection: Connection  # the one its messages come through: who is at the other end
    caller: Caller
    caller_frame: bytes
    last_seen: float
    role: str  # what authorize() judges it as: its connection's, `service` once registered
    messages: int = 0
    malformed: int = 0
    instance: Instance | None = None
    subscription: AgentSubscription | None = None  # an agent's SUBSCRIBE: events sent on its connection


@dataclass(slots=True)
class AgentSubscription:
    """The topic prefixes an agent asked for, and the seq of the last event that matched them (sent
    or not): each delivery carries it as `prev`, so the agent sees a loss as a gap."""

    prefixes: tuple[str, ...]
    last_matched: int


@dataclass(slots=True)
class Instance:
    peer: Peer
    service: str
    instance_id: str
    methods: frozenset[str]
    schema_version: int
    concurrency: int
    stats: ServiceStats
    healthy: bool = True
    reason: str = ""
    in_flight: int = 0
    served: int = 0

    def load(self) -> tuple[float, int]:
        return self.in_flight / self.concurrency, self.served


@dataclass(slots=True)
class InFlight:
    token: bytes
    client: PeerKey
    request_id: str
    target: str
    deadline: float
    instance: Instance
    holder: Hashable  # whose in-flight cap it counts against (quota_holder)
    size: int  # its body's bytes, counted against the holder's byte budget while it is in flight


def quota_holder(peer: Peer) -> Hashable:
    """Whose limits a peer spends: an agent container's (all its connections together, so opening
    more connections buys nothing), else the peer's own."""
    return peer.caller.container or peer.key


@dataclass(slots=True)
class Held:
    """What one holder has in flight through the broker: requests, and their bodies' bytes."""

    requests: int = 0
    bytes: int = 0


class InFlightCaps:
    """Requests each peer (an agent: its container) may have in flight through the broker at once,
    and for agents the bytes of their bodies: past either a request is refused RESOURCE_EXHAUSTED
    before it reaches a service, so one caller cannot take every service's queue, nor keep a service
    receiving and decoding huge bodies. Agents and host peers have separate caps; host peers (trusted,
    and the ones that move big payloads) have no byte budget."""

    def __init__(self, limits: LimitsConfig):
        self.caps = {AGENTS_SOCKET: limits.agent_in_flight, SERVICES_SOCKET: limits.host_in_flight}
        self._keys = {AGENTS_SOCKET: "limits.agent_in_flight", SERVICES_SOCKET: "limits.host_in_flight"}
        self.byte_caps = {AGENTS_SOCKET: int(limits.agent_bytes_in_flight)}
        self.held: dict[Hashable, Held] = {}

    def admit(self, peer: Peer, target: str, size: int) -> Hashable:
        """Count one more request of `peer`, whose body is `size` bytes; its holder, to release it with."""
        holder = quota_holder(peer)
        held = self.held.get(holder) or Held()
        cap = self.caps[peer.socket]
        if held.requests >= cap:
            raise BusError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"{target} refused: this caller has {held.requests} requests in flight, the limit"
                f" {self._keys[peer.socket]} is {cap}: wait for answers before sending more",
                {"limit": cap, "in_flight": held.requests},
            )
        byte_cap = self.byte_caps.get(peer.socket)
        if byte_cap is not None and held.bytes + size > byte_cap:
            raise BusError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"{target} refused: this caller has {held.bytes} bytes in flight and this request is"
                f" {size} bytes, the limit limits.agent_bytes_in_flight is {byte_cap} bytes: wait for"
                " answers before sending more",
                {"limit": byte_cap, "bytes_in_flight": held.bytes, "size": size},
            )
        held.requests += 1
        held.bytes += size
        self.held[holder] = held
        return holder

    def release(self, holder: Hashable, size: int) -> None:
        held = self.held[holder]
        held.requests -= 1
        held.bytes -= size
        if not held.requests:
            del self.held[holder]

    def of(self, peer: Peer) -> Held:
        return self.held.get(quota_holder(peer)) or Held()


# What a replay is charged for each kept event it looks at, sent or not: the broker's loop spends about as
# long on the cheapest look (a topic prefix that does not match: ~280 ns; one its role may not receive costs
# 2-4 times that) as on sending this many bytes of events (~1.2 ns a byte: built, checked, encoded, copied
# into ZeroMQ). Measured on this 2-core VM with EventLog.replay over 11,000 kept events.
REPLAY_SCAN_BYTES = 256


class EventQuotas:
    """What each agent (its container; its connection without one) may publish: a token bucket of
    events and one of bytes; and the bytes of events it may be sent by bus.events.replay, which the
    broker builds on its loop (an agent replaying its session's history in a loop held every caller's
    calls up). Host peers are not limited here (their topics are their own domain's)."""

    def __init__(self, limits: LimitsConfig):
        self.limits = limits
        self.buckets: dict[Hashable, tuple[TokenBucket, TokenBucket]] = {}
        self.replays: dict[Hashable, TokenBucket] = {}

    def replay_allowance(self, peer: Peer, now: float) -> float:
        """The bytes of events the agent may be sent by a replay now: its page is cut there (one event
        at least; charge_replay counts what it cost). Below a tenth of a second's refill, RESOURCE_EXHAUSTED
        with `retry_after`, the seconds until that is there: a page then is worth its round trip, where
        "just above zero" would be one event a call to a client that asks again at once."""
        bucket = self._replay_bucket(peer)
        least = bucket.rate / 10
        left = bucket.available(now)
        if left >= least:
            return left
        retry_after = (least - left) / bucket.rate
        raise BusError(
            ErrorCode.RESOURCE_EXHAUSTED,
            f"bus.events.replay refused: this agent is sent more than limits.agent_replay_bytes_per_second"
            f" ({int(bucket.rate)} bytes of events): try again in {retry_after:.1f}s",
            {"limit": "limits.agent_replay_bytes_per_second", "retry_after": retry_after},
        )

    def charge_replay(self, peer: Peer, page: ReplayPage, now: float) -> None:
        """Charge what a replay cost the broker's loop: the bytes of events sent, or REPLAY_SCAN_BYTES for
        each kept event it looked at when that is more (a replay matching nothing scans the whole history
        too). A replay that looked at nothing (`limit` 0, nothing after `since`) costs nothing."""
        cost = max(page.size, page.scanned * REPLAY_SCAN_BYTES)
        if cost:
            self._replay_bucket(peer).charge(cost, now)

    def _replay_bucket(self, peer: Peer) -> TokenBucket:
        """The bucket of replayed bytes of the agent's container: one second of the rate, full when new."""
        holder = quota_holder(peer)
        bucket = self.replays.get(holder)
        if bucket is None:
            rate = float(self.limits.agent_replay_bytes_per_second)
            bucket = self.replays[holder] = TokenBucket(rate, rate)
        return bucket

    def refusal(self, peer: Peer, size: int, now: float) -> str | None:
        """None when the agent may publish an event of `size` bytes now (and it is counted), else why not."""
        holder = quota_holder(peer)
        buckets = self.buckets.get(holder)
        if buckets is None:
            limits = self.limits
            buckets = self.buckets[holder] = (
                TokenBucket(limits.agent_events_per_second, limits.agent_event_burst),
                TokenBucket(
                    float(limits.agent_event_bytes_per_second), float(limits.agent_event_burst_bytes)
                ),
            )
        events, sizes = buckets
        if not events.holds(1, now):
            return (
                f"event refused: this agent publishes more than limits.agent_events_per_second"
                f" ({self.limits.agent_events_per_second:g}, bursts of {self.limits.agent_event_burst})"
            )
        if not sizes.take(size, now):
            rate, burst = (
                int(self.limits.agent_event_bytes_per_second),
                int(self.limits.agent_event_burst_bytes),
            )
            return (
                f"event of {size} bytes refused: this agent publishes more than"
                f" limits.agent_event_bytes_per_second ({rate} bytes, bursts of {burst})"
            )
        events.take(1, now)
        return None

    def prune(self, now: float) -> None:
        """Forget the buckets that have filled up again: a new one would be the same."""
        for holder in [
            h for h, (events, sizes) in self.buckets.items() if events.full(now) and sizes.full(now)
        ]:
            del self.buckets[holder]
        for holder in [h for h, bucket in self.replays.items() if bucket.full(now)]:
            del self.replays[holder]


def check_deadline(target: str, deadline: float, now: float) -> None:
    """Refuse a deadline that is not a finite time, or one that has passed."""
    if not math.isfinite(deadline):
        raise BusError(ErrorCode.INVALID_ARGUMENT, f"deadline of {target} is not a finite time")
    if deadline <= now:
        raise BusError(ErrorCode.TIMEOUT, f"deadline of {target} passed before delivery")


@dataclass
class Failure:
    """A request the broker must answer with an error itself."""

    request: InFlight
    code: ErrorCode
    message: str


def caller_of(key: PeerKey, socket: str, connection: Connection, role: str, service: str = "") -> Caller:
    """The Caller stamped on everything a peer sends: from its connection, never from the peer."""
    credentials = connection.credentials
    return Caller(
        socket=socket,
        peer=key[1].hex(),
        service=service,
        uid=credentials.uid,
        gid=credentials.gid,
        pid=credentials.pid,
        role=role,
        session=connection.session,
        container=connection.container if connection.identity is not None else "",
    )


class Registry:
    def __init__(
        self,
        heartbeat_interval: float,
        liveness: int,
        encode_caller,
        first_token: int = 1,
        limits: LimitsConfig | None = None,
    ):
        self.heartbeat_interval = heartbeat_interval
        self.expiry = heartbeat_interval * liveness
        self._encode_caller = encode_caller
        self.peers: dict[PeerKey, Peer] = {}
        self.pools: dict[str, list[Instance]] = {}
        self.in_flight: dict[bytes, InFlight] = {}
        limits = limits or _DEFAULT_LIMITS
        self.caps = InFlightCaps(limits)
        self.event_quotas = EventQuotas(limits)
        self._by_request: dict[tuple[PeerKey, str], bytes] = {}
        # A service may still answer a previous broker's requests after a restart: tokens must not repeat.
        self._tokens = itertools.count(first_token)
        self._routes: dict[str, list[Instance]] = {}  # target -> healthy instances offering it
        self._deadlines: list[tuple[float, bytes]] = []  # heap of (deadline, token); finished ones linger
        self.per_service: dict[str, ServiceStats] = collections.defaultdict(ServiceStats)
        # bus.service.up/down to publish: one up when an instance id first appears, one down when
        # its last registration goes (a service that reconnects and registers again is no news)
        self.announcements: list[ServiceUp | ServiceDown] = []

    # -- peers --------------------------------------------------------------------------------

    def touch(
        self, key: PeerKey, socket: str, connection: Connection, now: float, grant: Grant | None = None
    ) -> Peer:
        """The peer a message came from; `connection` (who is at the other end) and `grant` (its CURVE
        key's role and scope, on tcp://) matter only for a new one: the broker drops a peer whose routing
        id turns up on another connection first."""
        peer = self.peers.get(key)
        if peer is None:
            role = connection.role if grant is None else grant.role
            caller = caller_of(key, socket, connection, role)
            if grant is not None:
                caller = msgspec.structs.replace(
                    caller, session=grant.session, container=grant.container, key=grant.key
                )
            peer = Peer(key, socket, connection, caller, self._encode_caller(caller), now, role)
            self.peers[key] = peer
            connection.peers.add(key)
        peer.last_seen = now
        peer.messages += 1
        return peer

    def restamp(self, peer: Peer) -> None:
        """It registered, or its connection's identity changed (bus.agents.update): stamp what it sends
        anew. A CURVE peer keeps its key's scope (its connection has no identity of its own)."""
        service = peer.instance.service if peer.instance is not None else ""
        if peer.caller.key:
            peer.role = authorize.SERVICE if peer.instance is not None else peer.role
            peer.caller = msgspec.structs.replace(peer.caller, service=service, role=peer.role)
        else:
            peer.role = authorize.SERVICE if peer.instance is not None else peer.connection.role
            peer.caller = caller_of(peer.key, peer.socket, peer.connection, peer.role, service)
        peer.caller_frame = self._encode_caller(peer.caller)

    def register(self, peer: Peer, reg: Register) -> tuple[Instance, list[Failure]]:
        """Add (or replace) the peer's instance; the failures are what its previous one was serving."""
        if not reg.service or not set(reg.service) <= SERVICE_NAME_CHARS or reg.service == "bus":
            raise BusError(ErrorCode.INVALID_ARGUMENT, f"invalid service name {reg.service!r}")
        foreign = [m for m in reg.methods if not m.startswith(reg.service + ".")]
        if foreign:
            raise BusError(
                ErrorCode.INVALID_ARGUMENT,
                f"methods outside service {reg.service!r}: {', '.join(foreign)}",
                {"methods": foreign},
            )
        known = self._registered(reg.service, reg.instance)
        failures: list[Failure] = []
        if peer.instance is not None:
            same = (peer.instance.service, peer.instance.instance_id) == (reg.service, reg.instance)
            failures = self.drop_instance(peer, "re-registered", announce=not same)
        instance = Instance(
            peer=peer,
            service=reg.service,
            instance_id=reg.instance,
            methods=frozenset(reg.methods),
            schema_version=reg.schema_version,
            concurrency=max(1, reg.concurrency),
            stats=self.per_service[reg.service],
            healthy=reg.healthy,
            reason=reg.reason,
        )
        peer.instance = instance
        self.restamp(peer)
        self.pools.setdefault(reg.service, []).append(instance)
        self._routes.clear()
        if not known:
            self.announcements.append(ServiceUp(service=reg.service, instance=reg.instance))
        return instance, failures

    def _registered(self, service: str, instance_id: str) -> bool:
        return any(i.instance_id == instance_id for i in self.pools.get(service, ()))

    def set_health(self, peer: Peer, healthy: bool, reason: str) -> None:
        instance = peer.instance
        if instance is not None and (instance.healthy, instance.reason) != (healthy, reason):
            instance.healthy = healthy
            instance.reason = reason
            self._routes.clear()

    def drop_instance(self, peer: Peer, reason: str, announce: bool = True) -> list[Failure]:
        """Forget a service instance; its in-flight requests fail with UNAVAILABLE at once."""
        instance = peer.instance
        if instance is None:
            return []
        peer.instance = None
        pool = self.pools.get(instance.service, [])
        if instance in pool:
            pool.remove(instance)
        if not pool:
            self.pools.pop(instance.service, None)
        self._routes.clear()
        if announce and not self._registered(instance.service, instance.instance_id):
            self.announcements.append(
                ServiceDown(service=instance.service, instance=instance.instance_id, reason=reason)
            )
        message = f"service {instance.service} instance {instance.instance_id} {reason}"
        served_here = [r for r in self.in_flight.values() if r.instance is instance]
        for request in served_here:
            self._finish(request.token)
        return [Failure(request, ErrorCode.UNAVAILABLE, message) for request in served_here]

    def drop_peer(self, key: PeerKey, reason: str) -> tuple[list[Failure], list[InFlight]]:
        """Forget a peer: fail what it was serving, and return what it was waiting for (to cancel)."""
        peer = self.peers.pop(key, None)
        if peer is None:
            return [], []
        peer.connection.peers.discard(key)
        failures = self.drop_instance(peer, reason)
        abandoned = [r for r in self.in_flight.values() if r.client == key]
        for request in abandoned:
            self._finish(request.token)
        return failures, abandoned

    # -- requests -----------------------------------------------------------------------------

    def route(
        self, client: Peer, request_id: str, target: str, deadline: float, now: float, size: int = 0
    ) -> InFlight:
        """Pick the least loaded healthy instance for `target` and record the request (whose body is
        `size` bytes) in flight."""
        instances = self._routes.get(target) or self._find_route(target)
        check_deadline(target, deadline, now)
        key = (client.key, request_id)
        if key in self._by_request:
            raise BusError(ErrorCode.ALREADY_EXISTS, f"request id {request_id!r} is already in flight")
        holder = self.caps.admit(client, target, size)
        instance = instances[0] if len(instances) == 1 else min(instances, key=Instance.load)
        token = next(self._tokens).to_bytes(TOKEN_SIZE, "big")
        request = InFlight(token, client.key, request_id, target, deadline, instance, holder, size)
        self.in_flight[token] = request
        self._by_request[key] = token
        heapq.heappush(self._deadlines, (deadline, token))
        instance.in_flight += 1
        instance.stats.requests += 1
        return request

    def _find_route(self, target: str) -> list[Instance]:
        """Healthy instances offering `target` (cached until a registration or health change),
        or the error that says why there are none."""
        service, _, method = target.partition(".")
        if not method:
            raise BusError(ErrorCode.INVALID_ARGUMENT, f"target {target!r} is not service.method")
        pool = self.pools.get(service)
        if not pool:
            raise BusError(ErrorCode.UNAVAILABLE, f"no instance of service {service!r} is registered")
        candidates = [i for i in pool if target in i.methods]
        if not candidates:
            raise BusError(ErrorCode.NOT_FOUND, f"service {service!r} has no method {target!r}")
        healthy = [i for i in candidates if i.healthy]
        if not healthy:
            reasons = "; ".join(sorted({i.reason for i in candidates if i.reason})) or "unhealthy"
            raise BusError(ErrorCode.UNAVAILABLE, f"service {service!r} is unhealthy: {reasons}")
        self._routes[target] = healthy
        return healthy

    def complete(self, sender: Peer, token: bytes, final: bool, error: str = "") -> InFlight | None:
        """The request a reply answers, if `sender` is the instance it was routed to: nobody else
        can answer it, whatever token they learnt or guessed."""
        request = self.in_flight.get(token)
        if request is None or request.instance.peer is not sender:
            return None
        if not final:
            return request
        instance = request.instance
        instance.served += 1
        instance.stats.replies += 1
        if error:
            instance.stats.errors[error] = instance.stats.errors.get(error, 0) + 1
        return self._finish(token)

    def withdraw(self, token: bytes) -> None:
        """Forget a request that could not be delivered, without counting it as served."""
        self._finish(token)

    def cancel(self, client: PeerKey, request_id: str) -> InFlight | None:
        token = self._by_request.get((client, request_id))
        return self._finish(token) if token is not None else None

    def _finish(self, token: bytes) -> InFlight | None:
        request = self.in_flight.pop(token, None)
        if request is None:
            return None
        self._by_request.pop((request.client, request.request_id), None)
        request.instance.in_flight -= 1
        self.caps.release(request.holder, request.size)
        return request

    # -- time ---------------------------------------------------------------------------------

    def expire_peers(self, now: float) -> tuple[list[Failure], list[InFlight]]:
        """Drop silent peers: (failures to answer, requests to cancel at their services). A silent
        caller's own calls are answered UNAVAILABLE too, in case it is alive but hung."""
        failures: list[Failure] = []
        cancels: list[InFlight] = []
        for key in [k for k, p in self.peers.items() if now - p.last_seen > self.expiry]:
            dropped, abandoned = self.drop_peer(key, "missed its heartbeats")
            failures += dropped
            cancels += abandoned
            message = f"the broker heard no heartbeat from this caller for {self.expiry:g}s"
            failures += [Failure(request, ErrorCode.UNAVAILABLE, message) for request in abandoned]
        return failures, cancels

    def next_deadline(self) -> float | None:
        """When the earliest request in flight falls due (maybe one already answered: harmless)."""
        return self._deadlines[0][0] if self._deadlines else None

    def expire_deadlines(self, now: float) -> list[InFlight]:
        """Requests in flight whose deadline has come, forgotten: each to answer TIMEOUT and cancel."""
        due: list[InFlight] = []
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            request = self._finish(heapq.heappop(heap)[1])
            if request is not None:
                due.append(request)
        if len(heap) > 2 * len(self.in_flight) + 1024:  # most entries answered long ago: rebuild
            self._deadlines = [(r.deadline, r.token) for r in self.in_flight.values()]
            heapq.heapify(self._deadlines)
        return due

    # -- views for bus.* ----------------------------------------------------------------------

    def services_view(self, now: float, only: str = "") -> list[ServiceInfo]:
        return [
            ServiceInfo(
                name=name,
                instances=[
                    InstanceInfo(
                        instance=i.instance_id,
                        peer=i.peer.caller.peer,
                        pid=i.peer.caller.pid,
                        methods=sorted(i.methods),
                        schema_version=i.schema_version,
                        concurrency=i.concurrency,
                        in_flight=i.in_flight,
                        served=i.served,
                        heartbeat_age=round(now - i.peer.last_seen, 3),
                        healthy=i.healthy,
                        reason=i.reason,
                    )
                    for i in pool
                ],
            )
            for name, pool in sorted(self.pools.items())
            if not only or name == only
        ]

    def peers_view(self, now: float) -> list[PeerInfo]:
        return [
            PeerInfo(
                peer=p.caller.peer,
                socket=p.socket,
                service=p.caller.service,
                uid=p.caller.uid,
                gid=p.caller.gid,
                pid=p.caller.pid,
                last_seen_age=round(now - p.last_seen, 3),
                messages=p.messages,
                malformed=p.malformed,
                role=p.role,
                session=p.caller.session,
                container=p.caller.container,
            )
            for p in self.peers.values()
        ]

    def agents_view(self, now: float) -> list[AgentInfo]:
        """The agent socket's peers, with who their connection is and what they have in flight."""
        asked = collections.Counter(r.client for r in self.in_flight.values())
        return [
            AgentInfo(
                container=p.connection.container,
                session=p.caller.session,
                role=p.role,
                peer=p.caller.peer,
                pid=p.caller.pid,
                connected_since=p.connection.accepted_at,
                last_seen_age=round(now - p.last_seen, 3),
                in_flight=asked[p.key],
                messages=p.messages,
            )
            for p in self.peers.values()
            if p.socket == AGENTS_SOCKET
        ]


_any_msgpack = msgspec.msgpack.Decoder()
# Far below what any decoder's recursion limit allows: a body nested deeper decodes in the broker
# but not in a subscriber with less stack left, nor inside a replay reply (three levels more).
MAX_NESTING = 100
_CONTAINERS = (dict, list, tuple)  # tuple: an array used as a map key
# Every level of nesting takes one map or array header byte: with fewer of those bytes in the
# body than the limit (nearly every body), the decoded value need not be walked.
_HEADER_BYTES = bytes(range(0x80, 0xA0)) + b"\xdc\xdd\xde\xdf"
_OTHER_BYTES = bytes(b for b in range(256) if b not in _HEADER_BYTES)


def is_one_msgpack_value(body: bytes) -> bool:
    """Whether `body` is exactly one well-formed msgpack value (strings valid UTF-8, nothing after it,
    nested at most MAX_NESTING deep).

    Building the Python objects is the only check msgspec offers that also validates the strings
    inside: decoding to msgspec.Raw or to an empty Struct checks structure and skips their content."""
    try:
        value = _any_msgpack.decode(body)
    except (msgspec.DecodeError, RecursionError):
        return False
    if len(body) <= MAX_NESTING:  # each level takes a byte at least: nearly every body ends here
        return True
    headers = len(bytes(body).translate(None, _OTHER_BYTES))  # bytes(): replay passes a msgspec.Raw
    return headers <= MAX_NESTING or _nesting_within(value, MAX_NESTING)


def _nesting_within(value, limit: int) -> bool:
    level = [value]
    for _ in range(limit):
        inner = []
        for container in level:
            if type(container) is dict:
                inner += [c for c in container if type(c) is tuple]
                inner += [c for c in container.values() if type(c) in _CONTAINERS]
            elif type(container) in _CONTAINERS:
                inner += [c for c in container if type(c) in _CONTAINERS]
        if not inner:
            return True
        level = inner
    return False


_Raw = msgspec.Raw


def _kept_size(event: StampedEvent) -> int:
    """What an event costs the history: its topic counts, since a peer may send one of up to 64 KiB."""
    return len(event.topic) + len(event.body)


class History:
    """One budget of kept events: the last `capacity` of them, and at most `max_bytes` of their
    topics and bodies (the newest event is kept whatever its size)."""

    def __init__(self, capacity: int, max_bytes: int):
        self.events: collections.deque[StampedEvent] = collections.deque()
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.bytes = 0

    def add(self, event: StampedEvent, size: int) -> None:
        """Keep `event`, whose _kept_size is `size` (the caller has it at hand: once per event published)."""
        events = self.events
        if len(events) >= self.capacity:
            if self.capacity <= 0:
                return  # keeps nothing
            oldest = events.popleft()
            size -= len(oldest.topic) + len(oldest.body)
        events.append(event)
        self.bytes += size
        while self.bytes > self.max_bytes and len(events) > 1:
            self.bytes -= _kept_size(events.popleft())

    def after(self, since: int) -> Iterator[StampedEvent]:
        """Kept events with seq > since, oldest first."""
        start = bisect.bisect_right(self.events, since, key=_seq_of)
        return itertools.islice(self.events, start, None)


def _seq_of(event: StampedEvent) -> int:
    return event.seq


@dataclass(slots=True)
class ReplayPage:
    """A replay's answer and its cost: the events, whether more are kept than it holds, their bytes
    (topics and bodies) and how many kept events were looked at to find them."""

    events: list[StampedEvent]
    more: bool = False
    size: int = 0
    scanned: int = 0


class EventLog:
    """Stamped events kept for replay to late or lagging subscribers, in two budgets: the host's
    (`capacity` events, `max_bytes`) and the agents' (their own `agent_capacity`, `agent_max_bytes`),
    so that however much agents publish, the host's history is never evicted by it. Only bodies that
    are one msgpack value get in, and replay checks them again, so a replay reply always decodes
    whatever the history holds."""

    def __init__(
        self,
        capacity: int,
        max_bytes: int,
        agent_capacity: int = _DEFAULT_LIMITS.agent_event_history,
        agent_max_bytes: int = int(_DEFAULT_LIMITS.agent_event_history_bytes),
    ):
        self.host = History(capacity, max_bytes)
        self.agents = History(agent_capacity, agent_max_bytes)
        self.last_seq = 0

    def append(
        self, topic: str, source: str, body: bytes, now: float, from_agent: bool = False
    ) -> StampedEvent:
        if not is_one_msgpack_value(body):
            raise BusError(
                ErrorCode.INVALID_ARGUMENT,
                f"the body of event {topic!r} is not one msgpack value nested at most {MAX_NESTING} deep",
                {"topic": topic},
            )
        self.last_seq += 1
        event = StampedEvent(seq=self.last_seq, time=now, topic=topic, source=source, body=_Raw(body))
        (self.agents if from_agent else self.host).add(event, len(topic) + len(body))
        return event

    @property
    def first_seq(self) -> int:
        firsts = [history.events[0].seq for history in (self.host, self.agents) if history.events]
        return min(firsts) if firsts else self.last_seq + 1

    def replay(
        self,
        since: int,
        topics: list[str],
        limit: int,
        visible: Callable[[str], bool] | None = None,
        max_bytes: float | None = None,
    ) -> ReplayPage:
        """Kept events after `since` whose topic starts with one of `topics` (and is `visible`): at
        most `limit` of them, and of `max_bytes` (topics and bodies; the first whatever its size);
        whether more of them are kept than that page holds (the scan stops at the first one past it),
        and what the page cost: its bytes and the kept events looked at."""
        page = ReplayPage([])
        if limit <= 0:
            return page
        prefixes = tuple(topics)
        for event in heapq.merge(self.host.after(since), self.agents.after(since), key=_seq_of):
            page.scanned += 1
            if not _is_wanted(event, prefixes, visible):
                continue
            size = _kept_size(event)
            if len(page.events) >= limit or (
                page.events and max_bytes is not None and page.size + size > max_bytes
            ):
                page.more = True  # its body is not checked: it is not sent
                return page
            if is_one_msgpack_value(event.body):
                page.events.append(event)
                page.size += size
        return page


def _is_wanted(event: StampedEvent, prefixes: tuple[str, ...], visible: Callable[[str], bool] | None) -> bool:
    return (not prefixes or event.topic.startswith(prefixes)) and (visible is None or visible(event.topic))
