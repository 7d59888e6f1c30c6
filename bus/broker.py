"""The broker: one thread, one poll loop around a socket-free Registry.

It routes on frames and reads only the small request header; bodies pass
through as opaque bytes (event bodies are checked to be one msgpack value, since
the broker keeps and replays them). Sockets are drained in batches with NOBLOCK,
so a busy socket costs one poll per batch rather than one per message.

Time inside the broker is monotonic; a request's wire deadline (Unix time) is
converted once on arrival and kept in a heap, so each call is answered TIMEOUT at
its deadline. A socket monitor reports each closed connection at once: the peers
that used it are probed and, once unroutable, dropped, so calls in flight at a
kill -9 are answered without waiting for missed heartbeats.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import logging
import math
import os
import signal
import time
from pathlib import Path
from typing import Callable

import msgspec
import zmq
from zmq.utils.monitor import parse_monitor_message

from baaaht.bus import authorize as auth
from baaaht.bus import curve, wire
from baaaht.bus.auth_failures import AuthFailures
from baaaht.bus.authorize import (
    ANSWER,
    CALL,
    REGISTER,
    SERVICE,
    authorize,
    kept_as_agents,
    may_receive,
    publish_topic,
)
from baaaht.bus.bad_input import BadInput
from baaaht.bus.connections import UNKNOWN, Connection, Connections, agent_role, host_role
from baaaht.bus.errors import BusError, validation_error
from baaaht.bus.identities import ContainerIdentities, Identities, credentials_of_fd, shut_down
from baaaht.bus.registry import (
    AGENTS_SOCKET,
    SERVICES_SOCKET,
    AgentSubscription,
    EventLog,
    Failure,
    Grant,
    InFlight,
    Peer,
    PeerKey,
    Registry,
    check_deadline,
)
from baaaht.common import socket_group
from baaaht.common.endpoints import Endpoints, ipc_path
from baaaht.common.identity import AgentIdentity
from baaaht.schemas.base import Request, split_topic, target_of, topic_for
from baaaht.schemas.bus import (
    AuthRule,
    BrokerStarted,
    BusAgentsList,
    BusAgentsListResult,
    BusAgentsUpdate,
    BusAgentsUpdateResult,
    BusAuthFailed,
    BusAuthKeysIssue,
    BusAuthKeysIssueResult,
    BusAuthKeysList,
    BusAuthKeysListResult,
    BusAuthKeysRevoke,
    BusAuthKeysRevokeResult,
    BusAuthRules,
    BusAuthRulesResult,
    BusEventsReplay,
    BusPeers,
    BusPeersResult,
    BusPing,
    BusServices,
    BusServicesResult,
    BusStats,
    BusStatsReport,
    Pong,
    ReplayResult,
    StampedEvent,
)
from baaaht.schemas.config import Config
from baaaht.schemas.errors import ErrorBody, ErrorCode

log = logging.getLogger("baaaht.broker")

BATCH = 256  # messages drained from one socket before looking at the others
# Fewer from the agents' socket: however fast agents send, a host peer's message waits behind at
# most this many of theirs (the ROUTER takes its peers' messages in turn within a socket).
AGENT_BATCH = 32
# ... or as many bytes: big messages (an agent's events of up to bus.max_event_size) end a batch
# early, so the other socket waits no longer behind them than behind small ones.
BATCH_BYTES = 1 << 20
SERVICES, AGENTS = 0, 1  # indexes of the two ROUTER sockets
EVENTS_SOCKET = "events"  # the PUB socket, by name (as the ROUTERs' SERVICES_SOCKET and AGENTS_SOCKET)
PROBE_INTERVAL = 0.005  # after a connection closed: how often to try its peers until ZeroMQ forgets them
PROBES = 20  # then a peer still routable is a new connection that reused the file descriptor
SUMMARY_TICKS = 10  # heartbeat intervals per malformed-input log period
REPLAY_LIMIT_MAX = 10_000  # events in one bus.events.replay reply, whatever `limit` asks
# A restarted broker's tokens start above any its predecessor gave out (unless that one routed over
# a million requests per millisecond between the two starts): a late reply to the old broker's
# request is dropped rather than taken for a new request's. Epoch ms << 20 fits 8 bytes until 2527.
TOKENS_PER_MS_BITS = 20
# The events stamped in one round of the loop go out on PUB together, in batches of about this size.
PUB_BATCH_BYTES = 64 * 1024
HEADER_SLACK = 64 * 1024  # ZMQ_MAXMSGSIZE is per frame: leave room so an oversized body still gets a reply
# Plain ints and the backend's send: pyzmq's flag enums and its Python-level send
# wrapper cost more per call than the send itself.
_send = zmq.backend.Socket.send
_get = zmq.backend.Socket.get
NOBLOCK = int(zmq.NOBLOCK)
SRCFD = int(zmq.SRCFD)
EVENTS = int(zmq.EVENTS)
POLLIN = int(zmq.POLLIN)
SNDMORE_NOBLOCK = int(zmq.SNDMORE | zmq.NOBLOCK)
RCVMORE = int(zmq.RCVMORE)
HEARTBEAT = wire.pack(wire.HEARTBEAT)
# What the broker's socket monitors report: a closed connection, and a handshake that failed (tcp://).
HANDSHAKE_FAILURES = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)
BUILTINS = (
    BusPing,
    BusServices,
    BusPeers,
    BusStats,
    BusAuthKeysIssue,
    BusAuthKeysList,
    BusAuthKeysRevoke,
    BusAgentsList,
    BusAgentsUpdate,
    BusAuthRules,
    BusEventsReplay,
)
MAX_PREFIXES = 64  # topic prefixes in one agent's SUBSCRIBE or replay
REFUSALS_LOGGED = 16  # distinct refusals logged per connection (all are counted in bus.stats.errors)
_builtin_decoders = {target_of(t): msgspec.msgpack.Decoder(t) for t in BUILTINS}


class Broker:
    def __init__(
        self, config: Config, context: zmq.Context | None = None, identities: Identities | None = None
    ):
        self.config = config
        self.endpoints = Endpoints.for_config(config.bus)
        # Who an agent connection is: the kernel's and the container manager's word (bus/identities.py).
        self.identities = identities or ContainerIdentities(self.endpoints.run_dir)
        self.connections = Connections()
        self.host_uid = os.getuid()
        self.max_message = int(config.bus.max_message_size)
        self.max_event = int(config.bus.max_event_size)
        self.started_at = time.time()
        self.started_mono = time.monotonic()
        self.epoch = int(self.started_at * 1000)
        self.registry = Registry(
            float(config.bus.heartbeat_interval),
            config.bus.heartbeat_liveness,
            wire.encode,
            first_token=self.epoch << TOKENS_PER_MS_BITS,
            limits=config.limits,
        )
        self.events = EventLog(
            config.bus.event_history,
            int(config.bus.event_history_bytes),
            config.limits.agent_event_history,
            int(config.limits.agent_event_history_bytes),
        )
        self.context = context or zmq.Context.instance()
        self.running = False
        self.counters = dict(messages_in=0, messages_out=0, bytes_in=0, bytes_out=0)
        self.errors: dict[str, int] = {}
        self.bad_input = BadInput(log, self.registry.heartbeat_interval * SUMMARY_TICKS)
        self.auth_failures = AuthFailures(log, self.registry.heartbeat_interval * SUMMARY_TICKS)
        self.curve: curve.CurveServer | None = None  # with TCP on: CURVE keys and ZAP
        self.pub_monitor: zmq.Socket | None = None  # handshake failures of the events socket on tcp://
        self._subscribers: dict[str, set[PeerKey]] = {}  # session -> agents with a SUBSCRIBE
        self._suspects: dict[PeerKey, int] = {}  # peers of a closed connection -> probes left
        self._departed: set[PeerKey] = set()  # peers a send found unroutable: to drop after the batch
        self._unpublished: list[StampedEvent] = []  # stamped and kept, not yet sent on PUB: _flush_events
        self._unpublished_bytes = 0
        self._clock_offset = time.time() - time.monotonic()  # Unix time = monotonic + offset
        self._lock_file = None

    # -- set-up -------------------------------------------------------------------------------

    def bind(self) -> None:
        run_dir = self.endpoints.run_dir
        os.makedirs(self.endpoints.agent_dir, mode=0o750, exist_ok=True)
        gid = self._socket_gid()
        for directory in (run_dir, self.endpoints.agent_dir):
            os.chmod(directory, 0o750)
            os.chown(directory, -1, gid)
        self._take_lock(run_dir)
        self.services = self._router()
        # The agents' socket has the same frame limit: limits.agent_bytes_in_flight bounds what an agent's
        # big requests cost the services, and a smaller frame limit would not bound the bytes a hostile agent
        # makes the broker read (refused or not), only each message's share of them.
        self.agents = self._router()
        self.pub = self.context.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.setsockopt(zmq.SNDHWM, 10_000)
        self.sockets = (self.services, self.agents)
        self.socket_names = (SERVICES_SOCKET, AGENTS_SOCKET)
        self.monitors = tuple(
            sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | HANDSHAKE_FAILURES)
            for sock in self.sockets
        )
        eps = self.endpoints
        for sock, ipc, tcp, name in (
            (self.services, eps.services, eps.tcp_services, SERVICES_SOCKET),
            (self.agents, eps.agents, eps.tcp_agents, AGENTS_SOCKET),
            (self.pub, eps.events, eps.tcp_events, EVENTS_SOCKET),
        ):
            self._bind_ipc(sock, ipc, gid)  # first: libzmq gives an endpoint the options set at its bind
            if tcp:
                self._bind_tcp(sock, tcp, name)

    def _bind_tcp(self, sock: zmq.Socket, endpoint: str, name: str) -> None:
        """tcp:// is for peers on other hosts, and always CURVE with a key the operator issued."""
        if self.curve is None:
            key_dir = Path(self.config.bus.key_dir or os.path.join(self.config.data_dir, curve.KEY_DIR))
            try:
                self.curve = curve.CurveServer(
                    self.context, key_dir, float(self.config.bus.tcp_handshake_timeout)
                )
            except curve.KeyFileError as exc:
                raise SystemExit(f"bus.key_dir: {exc}") from None
        self.curve.secure(sock, name)
        if sock is self.pub:
            self.pub_monitor = sock.get_monitor_socket(HANDSHAKE_FAILURES)
        sock.bind(endpoint)

    def _socket_gid(self) -> int:
        try:
            return socket_group.ensure_gid(self.config.bus.socket_group)
        except socket_group.GroupError as error:
            raise SystemExit(f"bus.socket_group: {error}") from None

    def _take_lock(self, run_dir: str) -> None:
        """One broker per run directory: a second one would unlink the first one's sockets."""
        self._lock_file = open(os.path.join(run_dir, "broker.lock"), "w")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"another broker is running on {run_dir}") from None

    def _router(self) -> zmq.Socket:
        sock = self.context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_message + HEADER_SLACK)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        return sock

    def _bind_ipc(self, sock: zmq.Socket, endpoint: str, gid: int) -> None:
        path = ipc_path(endpoint)
        if os.path.exists(path):
            os.unlink(path)  # stale: we hold the run directory's lock
        old = os.umask(0o117)  # the socket file is born 0660: no window where others can connect
        try:
            sock.bind(endpoint)
        finally:
            os.umask(old)
        os.chown(path, -1, gid)
        os.chmod(path, 0o660)

    # -- loop ---------------------------------------------------------------------------------

    def run(self) -> None:
        self.running = True
        poller = zmq.Poller()
        for sock in (*self.sockets, *self.monitors, *self._auth_sockets()):
            poller.register(sock, zmq.POLLIN)
        self.publish_own(BrokerStarted(pid=os.getpid()))
        interval = self.registry.heartbeat_interval
        next_tick = time.monotonic() + interval
        next_probe = 0.0  # while there are suspects
        log.info("broker ready", extra={"endpoints": self.endpoints.__dict__})
        while self.running:
            self._flush_events()  # what this round stamped goes out before the loop waits again
            deadline = self.registry.next_deadline()
            wake = min(
                next_tick,
                next_probe if self._suspects else math.inf,
                math.inf if deadline is None else deadline,
            )
            timeout_ms = max(0, math.ceil((wake - time.monotonic()) * 1000))
            try:
                ready = poller.poll(timeout_ms)
            except zmq.ZMQError as exc:
                if exc.errno == zmq.EINTR:
                    continue
                raise
            for sock, _ in ready:
                if sock in self.monitors:
                    self._on_monitor(self.monitors.index(sock))
                elif sock in self.sockets:
                    self._drain(sock)
                else:
                    try:
                        self._on_auth_socket(sock)
                    except Exception:  # a bug must cost one handshake, never the broker
                        log.exception("failed to handle an authentication")
                        self.errors["INTERNAL"] = self.errors.get("INTERNAL", 0) + 1
            now = time.monotonic()
            if self._suspects and now >= next_probe:
                self._probe()
                next_probe = now + PROBE_INTERVAL
            deadline = self.registry.next_deadline()
            if deadline is not None and deadline <= now:
                self._time_out(now)
            if now >= next_tick:
                self._tick(now)
                next_tick = now + interval
            self._settle()
        self.close()

    def stop(self, *_args) -> None:
        self.running = False

    def close(self) -> None:
        for sock in (*self.sockets, *([self.pub] if self.pub_monitor else [])):
            sock.disable_monitor()
        for sock in (*self.monitors, *self._auth_sockets(), *self.sockets, self.pub):
            sock.close(linger=0)
        for endpoint in (self.endpoints.services, self.endpoints.agents, self.endpoints.events):
            path = ipc_path(endpoint)
            if path and os.path.exists(path):
                os.unlink(path)
        if self._lock_file:
            self._lock_file.close()

    def _drain(self, sock: zmq.Socket) -> None:
        index = self.sockets.index(sock)
        now = time.monotonic()  # one reading of each clock per batch
        self._clock_offset = time.time() - now  # wall = monotonic + offset: converts wire deadlines
        recv = sock.recv
        monitor = self.monitors[index]
        peers = self.registry.peers
        received = size = 0
        for _ in range(BATCH if index == SERVICES else AGENT_BATCH):
            try:
                ident = recv(NOBLOCK)
            except zmq.Again:
                break
            key = (index, ident)
            grant, refused = None, False
            # A connection's ACCEPTED (or its predecessor's DISCONNECTED) is in the monitor before its
            # first message is here: take it up first, so the message is judged by its own connection.
            if _get(monitor, EVENTS) & POLLIN:
                self._on_monitor(index)
            peer = peers.get(key)
            if peer is not None and peer.connection.live:
                connection = peer.connection  # ZeroMQ never gives a live connection's routing id to another
                envelope = recv(NOBLOCK)  # a ROUTER message always has a frame after the routing id
            else:  # a new peer, or one whose connection has closed: which connection is it on?
                frame = recv(NOBLOCK, copy=False)
                envelope = frame.bytes
                fd = frame.get(SRCFD)
                connection = self._connection_of(index, fd, peer)
                user = curve.frame_user(frame) if peer is None or peer.connection is not connection else None
                if user is not None:  # a new peer over tcp://, authenticated with the key named `user`
                    grant = self._admit_keyed(key, user, fd, peer_address(frame), now)
                    refused = grant is None
            extra = 0
            while _get(sock, RCVMORE):
                recv(NOBLOCK)
                extra += 1
            received += 1
            size += len(envelope)
            if refused:
                continue  # its key has gone since its handshake: refused, and its connection closed
            try:
                self._handle(key, envelope, extra, connection, now, grant)
            except Exception:  # a bug must cost one message, never the broker
                log.exception("failed to handle a message", extra={"peer": ident.hex()})
                self.errors["INTERNAL"] = self.errors.get("INTERNAL", 0) + 1
            if size >= BATCH_BYTES:
                break
        self.counters["messages_in"] += received
        self.counters["bytes_in"] += size

    def _handle(
        self, key, envelope: bytes, extra: int, connection: Connection, now: float, grant: Grant | None = None
    ) -> None:
        kind = wire.kind_of(envelope)
        if not kind or extra:
            self._malformed(
                key,
                "not_baaaht",
                "not a baaaht message (expected one envelope: BHT1, a kind, a header length)",
                now,
            )
            return
        known = self.registry.peers.get(key)
        if known is not None and known.connection is not connection:  # a departed peer's routing id
            self._answer_all(*self.registry.drop_peer(key, "was replaced by another connection"))
        peer = self.registry.touch(key, self.socket_names[key[0]], connection, now, grant)
        if connection.revoked:
            self._refuse_revoked(peer, kind, envelope, now)
            return
        try:
            if kind == wire.REQUEST:
                self._on_request(peer, envelope, now)
            elif kind in (wire.REPLY, wire.PARTIAL):
                self._on_reply(peer, kind, envelope, now)
            elif kind == wire.HEARTBEAT:
                self._on_heartbeat(peer, wire.split(envelope)[1])
            elif kind == wire.CANCEL:
                self._on_cancel(peer, wire.split(envelope)[1].decode(errors="replace"))
            elif kind == wire.EVENT:
                self._on_events(peer, [wire.split(envelope)], now)
            elif kind == wire.EVENTS:  # a publisher's batch: each event judged as if sent alone
                self._on_events(peer, wire.events_in(wire.split(envelope)[1]), now)
            elif kind == wire.REGISTER:
                self._on_register(peer, wire.split(envelope)[1])
            elif kind == wire.SUBSCRIBE and key[0] == AGENTS:  # host peers have the PUB socket
                self._on_subscribe(peer, wire.split(envelope)[1], now)
            elif kind == wire.DISCONNECT:  # a clean goodbye: nothing to count or log
                self._answer_all(*self.registry.drop_peer(key, "disconnected"))
            else:
                self._malformed(key, "forbidden_kind", f"a peer may not send a {wire.KIND_NAMES[kind]}", now)
        except (msgspec.DecodeError, wire.MalformedFrame) as exc:
            name = wire.KIND_NAMES[kind]
            self._malformed(key, f"undecodable_{name}", f"undecodable {name}: {exc}", now)

    # -- handlers -----------------------------------------------------------------------------

    def _on_request(self, peer: Peer, envelope: bytes, now: float) -> None:
        header_bytes = wire.header_of(envelope)
        header = wire.request_header.decode(header_bytes)
        size = len(envelope) - wire.PREFIX - len(header_bytes)
        if size > self.max_message:
            message = f"message body of {size} bytes exceeds the limit of {self.max_message} bytes"
            self._reply_error(peer.key, header.id, BusError(ErrorCode.RESOURCE_EXHAUSTED, message))
            return
        denial = authorize(peer.role, CALL, header.target)
        if denial is not None:
            self._refuse(peer, header.id, denial)
            return
        if header.target.startswith("bus."):
            self._builtin(peer, header, wire.split(envelope)[1], now)
            return
        deadline = header.deadline - self._clock_offset  # the caller's Unix time on our monotonic clock
        while True:
            try:
                request = self.registry.route(peer, header.id, header.target, deadline, now, size)
            except BusError as exc:
                self._reply_error(peer.key, header.id, exc)
                return
            instance = request.instance
            if self._send(instance.peer.key, envelope, request.token + peer.caller_frame):
                return
            self.registry.withdraw(request.token)
            if instance.peer.key not in self._departed:
                message = f"service {instance.service} cannot take more requests (its queue is full)"
                self._reply_error(peer.key, header.id, BusError(ErrorCode.UNAVAILABLE, message))
                return
            self._forget(instance.peer.key)  # that instance is gone: try the next one, if any

    def _on_reply(self, peer: Peer, kind: bytes, envelope: bytes, now: float) -> None:
        final = kind == wire.REPLY
        header = wire.reply_header.decode(wire.header_of(envelope))
        if peer.instance is None:
            # A peer of the agent socket forging an answer is refused by its role (no agent role may ANSWER).
            forged = self.registry.in_flight.get(header.token)
            denial = authorize(peer.role, ANSWER, forged.target if forged else "*")
            if peer.socket == AGENTS_SOCKET and denial is not None:
                self._refuse(peer, "", denial)
                return
            self._malformed(
                peer.key, "unregistered_reply", "only a registered service instance may reply", now
            )
            return
        answered = self.registry.in_flight.get(header.token)
        if answered is not None and answered.instance.peer is peer:
            # Judged before the request is marked done: a refused answer leaves it in flight, to be
            # answered by the instance as it may, or TIMEOUT at its deadline (and cancelled there).
            denial = authorize(peer.role, ANSWER, answered.target)
            if denial is not None:
                self._refuse(peer, "", denial)
                return
        request = self.registry.complete(peer, header.token, final, header.error)
        if request is None:
            if not final:  # a stream whose caller is gone or cancelled: tell the handler to stop
                self._send(peer.key, wire.pack(wire.CANCEL, body=header.token))
            return
        self._send(request.client, envelope)

    def _on_cancel(self, peer: Peer, request_id: str) -> None:
        """The caller gave up: the service is told to stop, and the caller gets the call's last
        REPLY (CANCELLED) from the broker; whatever the service still sends for it is dropped."""
        request = self.registry.cancel(peer.key, request_id)
        if request is not None:
            self._send(request.instance.peer.key, wire.pack(wire.CANCEL, body=request.token))
            cancelled = BusError(ErrorCode.CANCELLED, f"{request.target} was cancelled by the caller")
            self._send(peer.key, wire.error_reply(request_id, cancelled))  # the caller's doing: no fault

    def _on_heartbeat(self, peer: Peer, body: bytes) -> None:
        if not body:
            return
        if peer.instance is None:  # a service we do not know (we restarted, or expired it): re-register
            forgotten = ErrorBody(
                code=ErrorCode.UNAVAILABLE, message="unknown service instance: register again"
            )
            self._send(peer.key, wire.pack(wire.DISCONNECT, body=wire.encode(forgotten)))
            return
        health = wire.health_body.decode(body)
        self.registry.set_health(peer, health.healthy, health.reason)

    def _on_register(self, peer: Peer, body: bytes) -> None:
        registration = wire.register_body.decode(body)
        try:
            denial = authorize(peer.role, REGISTER, registration.service)
            if denial is not None:
                raise BusError(ErrorCode.PERMISSION_DENIED, denial.message)
            if peer.caller.key and peer.role != SERVICE:
                message = f"key {peer.caller.key!r} has role {peer.role}: only a service key may register"
                raise BusError(ErrorCode.PERMISSION_DENIED, message)
            instance, failures = self.registry.register(peer, registration)
        except BusError as exc:
            self._send(peer.key, wire.pack(wire.DISCONNECT, body=wire.encode(exc.body())))
            return
        self._answer_all(failures, [])
        log.info("service registered", extra={"service": instance.service, "instance": instance.instance_id})

    def _on_events(self, peer: Peer, events: list[tuple[bytes, bytes]], now: float) -> None:
        """(topic, body) of each event a peer sent (one EVENT, or an EVENTS batch), each judged as if sent
        alone. Refusals are answered with a REPLY whose id is "" (an event has no id to answer). An
        agent's event is published in its own session (bus/authorize.py publish_topic)."""
        caller, role = peer.caller, peer.role
        from_agent = peer.socket == AGENTS_SOCKET
        if caller.container:
            source = f"{caller.role}:{caller.container}"
        else:
            source = caller.service or f"{peer.socket}:{caller.peer}"
        wall = now + self._clock_offset
        # a batch's topics mostly repeat: each is judged once (None: nothing judged yet, so that an
        # empty topic is judged too, not taken for the last one and published unchecked)
        judged: tuple[bytes | None, str, auth.Denial | None, bool] = (None, "", None, from_agent)
        for topic_bytes, body in events:
            if topic_bytes != judged[0]:
                topic, denial = publish_topic(
                    role, caller.session, topic_bytes.decode(errors="replace"), caller.service
                )
                judged = (topic_bytes, topic, denial, kept_as_agents(topic, from_agent))
            _, topic, denial, agents_share = judged
            if denial is not None:
                self._refuse(peer, "", denial)
                continue
            if len(body) > self.max_event:
                message = f"event of {len(body)} bytes exceeds the limit of {self.max_event} bytes"
                self._reply_error(peer.key, "", BusError(ErrorCode.RESOURCE_EXHAUSTED, message))
                continue
            if from_agent:
                refusal = self.registry.event_quotas.refusal(peer, len(body), now)
                if refusal is not None:
                    self._reply_error(peer.key, "", BusError(ErrorCode.RESOURCE_EXHAUSTED, refusal))
                    continue
            try:
                self._publish(topic, source, body, wall, agents_share)
            except BusError as exc:  # not one msgpack value: never kept, never republished
                self._malformed(peer.key, "event_body", exc.message, now, exc.details)

    def publish_own(self, event) -> None:
        self._publish(topic_for(event), "bus", wire.encode(event), time.time())

    def _publish(self, topic: str, source: str, body: bytes, wall: float, from_agent: bool = False) -> None:
        event = self.events.append(topic, source, body, wall, from_agent)
        self._unpublished.append(event)
        self._unpublished_bytes += len(topic) + len(body)
        if self._unpublished_bytes >= PUB_BATCH_BYTES:
            self._flush_events()
        if self._subscribers:  # agents subscribed to their session's events
            session = split_topic(topic)[1]
            if session in self._subscribers:
                self._deliver_to_agents(session, topic, event.seq, wall, source, body)

    def _flush_events(self) -> None:
        """Publish on PUB the events stamped since the last flush: one alone as [topic, EVENT], more as
        one [b"", EVENTS] (one send and one receive for all; docs/PROTOCOL.md). PUB never blocks: a
        subscriber past its high-water mark loses messages, sees a gap and replays."""
        events = self._unpublished
        if not events:
            return
        self._unpublished, self._unpublished_bytes = [], 0
        last = events[-1]
        if len(events) == 1:
            stamp = wire.EventStamp(last.seq, last.time, last.source, self.epoch, last.seq - 1)
            _send(self.pub, last.topic.encode(), SNDMORE_NOBLOCK)
            _send(self.pub, wire.pack(wire.EVENT, wire.encode(stamp), last.body), NOBLOCK)
        else:
            stamp = wire.EventStamp(last.seq, last.time, "bus", self.epoch, events[0].seq - 1)
            _send(self.pub, b"", SNDMORE_NOBLOCK)
            _send(self.pub, wire.pack(wire.EVENTS, wire.encode(stamp), wire.encode(events)), NOBLOCK)

    def _deliver_to_agents(self, session: str, topic: str, seq: int, wall: float, source: str, body: bytes):
        """The event, to each agent of its session subscribed to it that its role may receive, on the
        agent's own connection: [EVENT envelope, topic], stamped with the previous match's seq."""
        keys = self._subscribers[session]
        for key in list(keys):
            peer = self.registry.peers.get(key)
            subscription = peer.subscription if peer is not None else None
            if subscription is None or peer.caller.session != session:
                keys.discard(key)  # gone, unsubscribed or re-identified: lazily forgotten here
                continue
            if not topic.startswith(subscription.prefixes) or not may_receive(peer.role, session, topic):
                continue
            stamp = wire.EventStamp(seq, wall, source, self.epoch, subscription.last_matched)
            subscription.last_matched = seq
            self._send(key, wire.pack(wire.EVENT, wire.encode(stamp), body), topic.encode())
        if not keys:
            del self._subscribers[session]

    def _on_subscribe(self, peer: Peer, body: bytes, now: float) -> None:
        """An agent's topic prefixes (replacing those before; none stops): its own session's events
        that its role may receive. A prefix naming another session is refused."""
        prefixes = wire.subscribe_body.decode(body)
        denial = self._foreign_prefixes(peer, prefixes)
        if denial is not None:
            self._refuse(peer, "", denial)
            return
        if not prefixes:
            peer.subscription = None
            return
        peer.subscription = AgentSubscription(tuple(prefixes), self.events.last_seq)
        if peer.caller.session:
            self._subscribers.setdefault(peer.caller.session, set()).add(peer.key)

    def _foreign_prefixes(self, peer: Peer, prefixes: list[str]) -> auth.Denial | None:
        """Refuse topic prefixes that name another session than the agent's own (or too many)."""
        if len(prefixes) > MAX_PREFIXES:
            return auth.Denial(f"at most {MAX_PREFIXES} topic prefixes, not {len(prefixes)}")
        own = peer.caller.session
        for prefix in prefixes:
            session = split_topic(prefix)[1]
            if session and not (own and own.startswith(session)):
                return auth.Denial(f"{peer.role} peers see only their own session's events, not {session!r}")
        return None

    # -- built-in bus.* methods ---------------------------------------------------------------

    def _builtin(self, peer: Peer, header: wire.RequestHeader, body: bytes, now: float) -> None:
        decoder = _builtin_decoders.get(header.target)
        try:
            check_deadline(header.target, header.deadline, now + self._clock_offset)
        except BusError as exc:
            self._reply_error(peer.key, header.id, exc)
            return
        if decoder is None:
            self._reply_error(
                peer.key, header.id, BusError(ErrorCode.NOT_FOUND, f"no method {header.target!r}")
            )
            return
        try:
            request = decoder.decode(body)
            result = self._builtin_result(peer, request, now)
        except msgspec.DecodeError as exc:
            self._reply_error(peer.key, header.id, validation_error(header.target, exc))
            return
        except BusError as exc:
            self._reply_error(peer.key, header.id, exc)
            return
        self._send(peer.key, wire.reply(wire.REPLY, header.id, wire.encode(result)))

    def _builtin_result(self, peer: Peer, request: Request, now: float):
        if isinstance(request, BusPing):
            return Pong(
                broker_pid=os.getpid(),
                started_at=self.started_at,
                time=now + self._clock_offset,
                protocol=wire.PROTOCOL.decode(),
                caller=peer.caller,
                heartbeat_interval=self.registry.heartbeat_interval,
                heartbeat_liveness=self.config.bus.heartbeat_liveness,
            )
        if isinstance(request, BusServices):
            return BusServicesResult(services=self.registry.services_view(now, request.service))
        if isinstance(request, BusPeers):
            return BusPeersResult(peers=self.registry.peers_view(now))
        if isinstance(request, BusStats):
            return BusStatsReport(
                uptime=now - self.started_mono,
                errors=dict(self.errors),
                malformed=self.bad_input.total,
                malformed_kinds=dict(self.bad_input.by_kind),
                events_published=self.events.last_seq,
                last_event_seq=self.events.last_seq,
                per_service=dict(self.registry.per_service),
                auth_failed=dict(self.auth_failures.by_reason),
                **self.counters,
            )
        if isinstance(request, (BusAuthKeysIssue, BusAuthKeysList, BusAuthKeysRevoke)):
            return self._keys_result(request, now + self._clock_offset)
        if isinstance(request, BusAgentsList):
            return BusAgentsListResult(agents=self.registry.agents_view(now))
        if isinstance(request, BusAgentsUpdate):
            return self._update_identity(request.container_id)
        if isinstance(request, BusAuthRules):
            return rules_result()
        assert isinstance(request, BusEventsReplay)  # the last of BUILTINS
        return self._replay(peer, request, now)

    def _replay(self, peer: Peer, request: BusEventsReplay, now: float) -> ReplayResult:
        """Kept events; an agent's only of its own session and of tags its role may receive, the page cut
        at what its replay budget holds (one reply of its whole history held the loop ~100 ms) and charged
        what it sent or scanned; a replay with `limit` 0, just the numbers, costs nothing and is never
        refused: a subscription "from now" starts with one."""
        visible, allowance = None, None
        limit = min(request.limit, REPLAY_LIMIT_MAX)
        from_agent = peer.socket == AGENTS_SOCKET
        if from_agent:
            denial = self._foreign_prefixes(peer, request.topics)
            if denial is not None:
                raise BusError(ErrorCode.PERMISSION_DENIED, denial.message)
            if limit > 0:
                allowance = self.registry.event_quotas.replay_allowance(peer, now)
            role, session = peer.role, peer.caller.session
            visible = lambda topic: may_receive(role, session, topic)  # noqa: E731
        page = self.events.replay(request.since, request.topics, limit, visible, allowance)
        if from_agent:
            self.registry.event_quotas.charge_replay(peer, page, now)
        return ReplayResult(
            events=page.events,
            first_seq=self.events.first_seq,
            last_seq=self.events.last_seq,
            epoch=self.epoch,
            more=page.more,
        )

    # -- time ---------------------------------------------------------------------------------

    def _tick(self, now: float) -> None:
        self._answer_all(*self.registry.expire_peers(now))
        self.registry.event_quotas.prune(now)
        if self.curve is not None:
            self._expire_keys(now)
        for failure in self.auth_failures.flush(now):
            self.publish_own(failure)
        wall = time.time()
        for key, peer in list(self.registry.peers.items()):
            subscription = peer.subscription
            if subscription is None:
                self._send(key, HEARTBEAT)
            else:  # with the last match's seq: a subscribed agent sees a loss even when all is quiet
                stamp = wire.EventStamp(subscription.last_matched, wall, "bus", self.epoch)
                self._send(key, wire.pack(wire.HEARTBEAT, wire.encode(stamp)))
        self._flush_events()  # the heartbeat's seq is the last one sent
        stamp = wire.EventStamp(self.events.last_seq, wall, "bus", self.epoch)
        self.pub.send_multipart([b"", wire.pack(wire.HEARTBEAT, wire.encode(stamp))])
        self.bad_input.flush(now)

    def _time_out(self, now: float) -> None:
        due = self.registry.expire_deadlines(now)
        failures = [Failure(r, ErrorCode.TIMEOUT, f"{r.target} did not answer in time") for r in due]
        self._answer_all(failures, due)

    # -- departures ---------------------------------------------------------------------------

    def _on_monitor(self, index: int) -> None:
        """Connections accepted (who is at the other end is read now) and closed (their peers are
        probed until ZeroMQ has forgotten them)."""
        monitor = self.monitors[index]
        for _ in range(BATCH):
            try:
                event = parse_monitor_message(monitor.recv_multipart(NOBLOCK))
            except zmq.Again:
                return
            if event["event"] not in (zmq.EVENT_DISCONNECTED, zmq.EVENT_ACCEPTED):
                self._on_handshake_failed(self.socket_names[index], event)
                continue
            fd = int(event["value"])
            if event["event"] == zmq.EVENT_ACCEPTED:
                self._accept(index, fd)
            else:
                self._suspect(self.connections.closed(index, fd))

    def _suspect(self, connection: Connection | None) -> None:
        for key in connection.peers if connection is not None else ():
            if key in self.registry.peers:
                self._suspects[key] = PROBES

    def _probe(self) -> None:
        """A heartbeat to each suspect: unroutable means gone. ZeroMQ drops the route a moment
        after it reports the close; a peer still routable after all the probes is a new connection
        that got the same file descriptor."""
        for key in list(self._suspects):
            if key not in self.registry.peers or not self._send(key, HEARTBEAT) or self._suspects[key] <= 1:
                del self._suspects[key]
            else:
                self._suspects[key] -= 1

    def _settle(self) -> None:
        """Drop the peers found gone, and publish what the registry announces."""
        while self._departed:
            self._forget(next(iter(self._departed)))
        for event in self.registry.announcements:
            self.publish_own(event)
        self.registry.announcements.clear()

    def _forget(self, key: PeerKey) -> None:
        """A peer whose connection is gone: fail what it served, cancel what it asked for."""
        self._departed.discard(key)
        self._suspects.pop(key, None)
        self._answer_all(*self.registry.drop_peer(key, "disconnected"))

    # -- authentication on tcp:// (bus/curve.py) -----------------------------------------------

    def _auth_sockets(self) -> list[zmq.Socket]:
        found = [self.curve.zap.socket] if self.curve is not None else []
        return found + ([self.pub_monitor] if self.pub_monitor is not None else [])

    def _on_auth_socket(self, sock: zmq.Socket) -> None:
        now = time.monotonic()
        if sock is self.pub_monitor:
            for _ in range(BATCH):
                try:
                    event = parse_monitor_message(sock.recv_multipart(NOBLOCK))
                except zmq.Again:
                    return
                self._on_handshake_failed(EVENTS_SOCKET, event)
            return
        assert self.curve is not None and sock is self.curve.zap.socket
        for refusal, socket_name, address, name in self.curve.zap.serve(time.time()):
            self._auth_failed(refusal, socket_name, now, address, name)

    def _on_handshake_failed(self, socket_name: str, event: dict) -> None:
        """A handshake that failed before ZAP was asked (ZAP's refusals are told by the ZAP handler)."""
        kind, value, endpoint = event["event"], event["value"], event["endpoint"].decode(errors="replace")
        if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH or not endpoint.startswith("tcp://"):
            return
        if (
            kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH
        ):
            refusal = curve.Refusal(
                curve.MECHANISM, f"a peer offered no CURVE handshake on {endpoint} (NULL?)"
            )
        elif kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC:
            refusal = curve.Refusal(
                curve.HANDSHAKE,
                f"a CURVE handshake on {endpoint} failed its cryptography (a wrong server key?)",
            )
        elif kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL and value == errno.EAGAIN:
            refusal = curve.Refusal(curve.HANDSHAKE, f"a handshake on {endpoint} was not done in time")
        elif kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:  # `value` is an errno: mostly, the peer hung up
            refusal = curve.Refusal(
                curve.HANDSHAKE, f"a handshake on {endpoint} failed: {os.strerror(value)}"
            )
        else:
            refusal = curve.Refusal(
                curve.HANDSHAKE, f"a handshake on {endpoint} failed: {zmq.Event(value).name}"
            )
        self._auth_failed(refusal, socket_name, time.monotonic())

    def _auth_failed(self, refusal: curve.Refusal, socket_name: str, now: float, address="", key="") -> None:
        failure = BusAuthFailed(
            socket=socket_name, reason=refusal.reason, message=refusal.message, address=address, key=key
        )
        for event in self.auth_failures.note(failure, now):
            self.publish_own(event)

    def _admit_keyed(self, key: PeerKey, user: str, fd: int, address: str | None, now: float) -> Grant | None:
        """A new peer authenticated with the key named `user`: its Grant, or None when the key has gone
        since its handshake (revoked, expired): then it is refused and its connection closed."""
        assert self.curve is not None  # a ZAP User-Id exists only on the CURVE endpoints
        socket_name = self.socket_names[key[0]]
        found = self.curve.admit(key, user, fd, socket_name, now + self._clock_offset)
        if isinstance(found, curve.Refusal):
            self._auth_failed(found, socket_name, now, address or "", user)
            self._reply_error(key, "", BusError(ErrorCode.UNAUTHENTICATED, found.message))
            if peer_name := curve.peername_of(fd):
                curve.close_connection(fd, peer_name)
            return None
        return Grant(role=found.role, session=found.session, key=found.name)

    def _keys_result(self, request, wall: float):
        if self.curve is None:
            raise BusError(
                ErrorCode.FAILED_PRECONDITION, "bus.tcp_enabled is off: keys are for peers on tcp://"
            )
        server_key = self.curve.server.public_key
        if isinstance(request, BusAuthKeysIssue):
            record = self.curve.issue(request, wall)
            log.info(
                "issued a bus key", extra={"key": record.name, "role": record.role, "session": record.session}
            )
            return BusAuthKeysIssueResult(key=record, server_public_key=server_key)
        if isinstance(request, BusAuthKeysList):
            return BusAuthKeysListResult(keys=self.curve.keys.records(), server_public_key=server_key)
        record, peers = self.curve.revoke(request.name)
        for key in peers:
            self._answer_all(*self.registry.drop_peer(key, f"its key {record.name!r} was revoked"))
        log.info("revoked a bus key", extra={"key": record.name, "disconnected": len(peers)})
        return BusAuthKeysRevokeResult(key=record, disconnected=len(peers))

    def _expire_keys(self, now: float) -> None:
        assert self.curve is not None
        self.curve.forget(self.registry.peers)
        for key, record in self.curve.expire(now + self._clock_offset):
            self._answer_all(*self.registry.drop_peer(key, f"its key {record.name!r} expired"))
            message = f"key {record.name!r} expired at {curve.iso_time(record.expires_at)}: disconnected"
            self._auth_failed(
                curve.Refusal(curve.EXPIRED, message), self.socket_names[key[0]], now, key=record.name
            )

    # -- connections and identity -------------------------------------------------------------

    def _accept(self, index: int, fd: int) -> Connection:
        """A new connection: its kernel credentials and, on the agent socket, its container's identity,
        read once, now, while the process that connected is there (docs/IDENTITY.md)."""
        credentials = credentials_of_fd(fd)
        container, identity = "", None
        if index == AGENTS:
            if credentials is not None and credentials.pid > 0:
                container = self.identities.container_of(credentials.pid) or ""
            identity = self._identity_of(container) if container else None
            role = agent_role(identity)
        else:
            role = host_role(credentials, self.host_uid) if credentials is not None else auth.REFUSED
        connection, replaced = self.connections.accepted(
            index, fd, credentials or UNKNOWN, time.time(), role, container, identity
        )
        self._suspect(replaced)
        if role == auth.REFUSED:
            uid = connection.credentials.uid
            detail = f"uid {uid} is neither the host's ({self.host_uid}) nor root's"
            self._auth_failure(connection, "foreign_uid", detail)
        elif identity is not None and role == auth.UNIDENTIFIED:
            self._auth_failure(connection, "bad_role", f"an identity may not grant role {identity.role!r}")
        return connection

    def _connection_of(self, index: int, fd: int, peer: Peer | None) -> Connection:
        connection = self.connections.current(index, fd)
        if connection is not None:
            return connection
        if peer is not None and peer.connection.fd == fd:
            return peer.connection  # the last words of a connection that has closed
        return self._accept(index, fd)  # its ACCEPTED never came (the monitor's queue overflowed)

    def _identity_of(self, container: str) -> AgentIdentity | None:
        try:
            identity = self.identities.identity(container)
        except (OSError, ValueError) as exc:  # msgspec.DecodeError is a ValueError: a damaged file
            log.warning("unreadable identity", extra={"container": container, "error": str(exc)})
            return None
        return identity if identity is not None and identity.container_id == container else None

    def _update_identity(self, container: str) -> BusAgentsUpdateResult:
        """bus.agents.update: re-read the container's identity for its connections; none any more =
        revoked: they are refused from now on and disconnected at once."""
        self._on_monitor(AGENTS)  # every connection accepted so far is known
        identity = self._identity_of(container)
        connections = self.connections.of_container(container)
        revoked = False
        for connection in connections:
            if self.connections.reidentify(connection, identity):
                revoked = True
                self._revoke(connection)
                continue
            for key in connection.peers:
                peer = self.registry.peers[key]
                self.registry.restamp(peer)
                if peer.subscription is not None and peer.caller.session:
                    self._subscribers.setdefault(peer.caller.session, set()).add(key)
        log.info(
            "identity updated",
            extra={"container": container, "connections": len(connections), "revoked": revoked},
        )
        return BusAgentsUpdateResult(
            connections=len(connections),
            revoked=revoked,
            role=agent_role(identity),
            session=identity.session_id if identity is not None else "",
        )

    def _revoke(self, connection: Connection) -> None:
        """Forget its peers (what they asked is cancelled at the services) and end the connection."""
        for key in list(connection.peers):
            self._answer_all(*self.registry.drop_peer(key, "its identity was revoked"))
        if not shut_down(connection.fd, connection.credentials.inode):
            log.warning("could not shut a revoked connection down", extra={"fd": connection.fd})

    def _refuse_revoked(self, peer: Peer, kind: bytes, envelope: bytes, now: float) -> None:
        """A message on a connection whose identity was revoked: refused (a request by its id), counted,
        and the connection shut down (again: it may not have been the same socket at the first try)."""
        if kind in (wire.HEARTBEAT, wire.DISCONNECT):
            return
        request_id = ""
        if kind == wire.REQUEST:
            try:
                request_id = wire.request_header.decode(wire.header_of(envelope)).id
            except (msgspec.DecodeError, wire.MalformedFrame):
                pass
        connection = peer.connection
        message = f"the identity of container {connection.container} was revoked"
        self._reply_error(peer.key, request_id, BusError(ErrorCode.PERMISSION_DENIED, message))
        self._auth_failure(connection, "revoked", message)
        shut_down(connection.fd, connection.credentials.inode)

    def _refuse(self, peer: Peer, request_id: str, denial: auth.Denial) -> None:
        """PERMISSION_DENIED for what a peer's role may not do; an unidentified agent's attempt is an
        identity failure too."""
        self._reply_error(peer.key, request_id, BusError(ErrorCode.PERMISSION_DENIED, denial.message))
        if peer.role == auth.UNIDENTIFIED:
            self._auth_failure(peer.connection, "unidentified", denial.message)
        elif len(peer.connection.refusals_logged) < REFUSALS_LOGGED:
            if denial.message not in peer.connection.refusals_logged:
                peer.connection.refusals_logged.add(denial.message)
                log.warning(
                    "refused", extra={"caller": peer.caller.peer, "role": peer.role, "why": denial.message}
                )

    def _auth_failure(self, connection: Connection, reason: str, detail: str) -> None:
        """An identity failure: counted, logged and published (bus.auth.failed) as every refusal is
        (bus/auth_failures.py: one in full per reason and period, the rest summed up)."""
        credentials = connection.credentials
        address = f"uid {credentials.uid}, pid {credentials.pid}"
        if connection.container:
            address += f", container {connection.container}"
        socket_name = self.socket_names[connection.index]
        self._auth_failed(curve.Refusal(reason, detail), socket_name, time.monotonic(), address)

    # -- sending ------------------------------------------------------------------------------

    def _answer_all(self, failures: list[Failure], cancels: list[InFlight]) -> None:
        for failure in failures:
            self._reply_error(
                failure.request.client, failure.request.request_id, BusError(failure.code, failure.message)
            )
        for request in cancels:
            self._send(request.instance.peer.key, wire.pack(wire.CANCEL, body=request.token))

    def _reply_error(self, key, request_id: str, error: BusError) -> None:
        code = error.code.value
        self.errors[code] = self.errors.get(code, 0) + 1
        self._send(key, wire.error_reply(request_id, error))

    def _malformed(self, key, kind: str, message: str, now: float, details: dict | None = None) -> None:
        self.bad_input.note(kind, f"{self.socket_names[key[0]]}:{key[1].hex()}", message, now)
        peer = self.registry.peers.get(key)
        if peer is not None:
            peer.malformed += 1
        self._reply_error(key, "", BusError(ErrorCode.INVALID_ARGUMENT, message, details))

    def _send(self, key, envelope: bytes, route: bytes | None = None) -> bool:
        """Send to a peer; False when it is gone or its queue is full (never blocks the loop)."""
        sock = self.sockets[key[0]]
        try:
            _send(sock, key[1], SNDMORE_NOBLOCK)
            if route is None:
                _send(sock, envelope, NOBLOCK)
            else:
                _send(sock, envelope, SNDMORE_NOBLOCK)
                _send(sock, route, NOBLOCK)
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:  # the peer has gone: not a fault, and it is dropped
                if key in self.registry.peers:
                    self._departed.add(key)
                return False
            if exc.errno != zmq.EAGAIN:
                raise
            self.errors["queue_full"] = self.errors.get("queue_full", 0) + 1
            return False
        self.counters["messages_out"] += 1
        self.counters["bytes_out"] += len(envelope)
        return True


def peer_address(frame: zmq.Frame) -> str | None:
    try:
        return frame.get("Peer-Address")
    except zmq.ZMQError:
        return None


def rules_result() -> BusAuthRulesResult:
    """bus.auth.rules: the table of bus/authorize.py, `!pattern` for a denying rule."""
    rules = [
        AuthRule(role=role, action=action, patterns=[p if allowed else f"!{p}" for p, allowed in rules])
        for role, action, rules in auth.rules_table()
    ]
    return BusAuthRulesResult(rules=rules, domains={s: list(t) for s, t in auth.DOMAINS.items()})


def arguments(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Run the baaaht bus broker.")
    parser.add_argument("--config", default=os.environ.get("BAAAHT_CONFIG"))
    return parser


def serve(config_path: str | None, identities_for: Callable[[str], Identities] | None = None) -> None:
    """Run a broker until SIGTERM or SIGINT; `identities_for(run_dir)` is its identity adapter."""
    from baaaht.common.config import load_config
    from baaaht.common.logs import setup_logging

    config, _sources = load_config(config_path)
    setup_logging(config.log, "broker")
    run_dir = Endpoints.for_config(config.bus).run_dir
    broker = Broker(config, identities=identities_for(run_dir) if identities_for else None)
    broker.bind()
    signal.signal(signal.SIGTERM, broker.stop)
    signal.signal(signal.SIGINT, broker.stop)
    broker.run()


def main(argv: list[str] | None = None) -> None:
    serve(arguments("baaaht-broker").parse_args(argv).config)


if __name__ == "__main__":
    main()
