"""The broker: one thread, one poll loop around a socket-free Registry.

It routes on frames and reads only the small request header; bodies pass
through as opaque bytes. Sockets are drained in batches with NOBLOCK, so a busy
socket costs one poll per batch rather than one per message.
"""

from __future__ import annotations

import argparse
import fcntl
import grp
import logging
import os
import signal
import time

import msgspec
import zmq

from baaaht.bus import wire
from baaaht.bus.errors import BusError, validation_error
from baaaht.bus.registry import AGENTS_SOCKET, SERVICES_SOCKET, EventLog, Failure, InFlight, Peer, Registry
from baaaht.common.endpoints import Endpoints, ipc_path
from baaaht.schemas.base import Request, target_of, topic_of
from baaaht.schemas.bus import (
    BrokerStarted,
    BusStats,
    EventsReplay,
    PeersList,
    PeersQuery,
    Ping,
    Pong,
    ReplayResult,
    ServiceDown,
    ServicesList,
    ServicesQuery,
    ServiceUp,
    StatsQuery,
)
from baaaht.schemas.config import Config
from baaaht.schemas.errors import ErrorBody, ErrorCode

log = logging.getLogger("baaaht.broker")

BATCH = 256  # messages drained from one socket before looking at the others
SERVICES, AGENTS = 0, 1  # indexes of the two ROUTER sockets
AGENT_TOPICS = "agent."  # the only event topics agents may publish
AGENT_BUILTINS = ("bus.ping",)
HEADER_SLACK = 64 * 1024  # ZMQ_MAXMSGSIZE is per frame: leave room so an oversized body still gets a reply
# Plain ints and the backend's send: pyzmq's flag enums and its Python-level send
# wrapper cost more per call than the send itself.
_send = zmq.backend.Socket.send
_get = zmq.backend.Socket.get
NOBLOCK = int(zmq.NOBLOCK)
SNDMORE_NOBLOCK = int(zmq.SNDMORE | zmq.NOBLOCK)
RCVMORE = int(zmq.RCVMORE)
HEARTBEAT = wire.pack(wire.HEARTBEAT)
BUILTINS = (Ping, ServicesQuery, PeersQuery, StatsQuery, EventsReplay)
_builtin_decoders = {target_of(t): msgspec.msgpack.Decoder(t) for t in BUILTINS}


class Broker:
    def __init__(self, config: Config, context: zmq.Context | None = None):
        self.config = config
        self.endpoints = Endpoints.for_config(config.bus)
        self.max_message = int(config.bus.max_message_size)
        self.max_event = int(config.bus.max_event_size)
        self.registry = Registry(
            float(config.bus.heartbeat_interval), config.bus.heartbeat_liveness, wire.encode
        )
        self.events = EventLog(config.bus.event_history, int(config.bus.event_history_bytes))
        self.context = context or zmq.Context.instance()
        self.started_at = time.time()
        self.epoch = int(self.started_at * 1000)
        self.running = False
        self.counters = dict(messages_in=0, messages_out=0, bytes_in=0, bytes_out=0, malformed=0)
        self.errors: dict[str, int] = {}
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
        self.agents = self._router()
        self.pub = self.context.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.setsockopt(zmq.SNDHWM, 10_000)
        self.sockets = (self.services, self.agents)
        self.socket_names = (SERVICES_SOCKET, AGENTS_SOCKET)
        eps = self.endpoints
        for sock, ipc, tcp in (
            (self.services, eps.services, eps.tcp_services),
            (self.agents, eps.agents, eps.tcp_agents),
            (self.pub, eps.events, eps.tcp_events),
        ):
            self._bind_ipc(sock, ipc, gid)
            if tcp:
                sock.bind(tcp)

    def _socket_gid(self) -> int:
        group = self.config.bus.socket_group
        return grp.getgrnam(group).gr_gid if group else os.getgid()

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
        for sock in self.sockets:
            poller.register(sock, zmq.POLLIN)
        self.publish_own(BrokerStarted(pid=os.getpid()))
        interval = self.registry.heartbeat_interval
        next_tick = time.time() + interval
        log.info("broker ready", extra={"endpoints": self.endpoints.__dict__})
        while self.running:
            timeout_ms = max(0.0, (next_tick - time.time()) * 1000)
            try:
                ready = poller.poll(timeout_ms)
            except zmq.ZMQError as exc:
                if exc.errno == zmq.EINTR:
                    continue
                raise
            for sock, _ in ready:
                self._drain(sock)
            now = time.time()
            if now >= next_tick:
                self._tick(now)
                next_tick = now + interval
        self.close()

    def stop(self, *_args) -> None:
        self.running = False

    def close(self) -> None:
        for sock in (*self.sockets, self.pub):
            sock.close(linger=0)
        for endpoint in (self.endpoints.services, self.endpoints.agents, self.endpoints.events):
            path = ipc_path(endpoint)
            if path and os.path.exists(path):
                os.unlink(path)
        if self._lock_file:
            self._lock_file.close()

    def _drain(self, sock: zmq.Socket) -> None:
        index = self.sockets.index(sock)
        now = time.time()  # one clock reading per batch
        recv = sock.recv
        peers = self.registry.peers
        received = size = 0
        for _ in range(BATCH):
            try:
                ident = recv(NOBLOCK)
            except zmq.Again:
                break
            key = (index, ident)
            address = None
            if index == SERVICES and key in peers:
                envelope = recv(NOBLOCK)  # a ROUTER message always has a frame after the routing id
            else:
                # A new peer, or an agent: read the kernel credentials off the frame. For agents this
                # is done on every message, so a new connection that chose a departed agent's routing
                # id is seen as the new peer it is.
                frame = recv(NOBLOCK, copy=False)
                envelope, address = frame.bytes, peer_address(frame)
            extra = 0
            while _get(sock, RCVMORE):
                recv(NOBLOCK)
                extra += 1
            received += 1
            size += len(envelope)
            try:
                self._handle(key, envelope, extra, address, now)
            except Exception:  # a bug must cost one message, never the broker
                log.exception("failed to handle a message", extra={"peer": ident.hex()})
                self.errors["INTERNAL"] = self.errors.get("INTERNAL", 0) + 1
        self.counters["messages_in"] += received
        self.counters["bytes_in"] += size

    def _handle(self, key, envelope: bytes, extra: int, address: str | None, now: float) -> None:
        kind = wire.kind_of(envelope)
        if not kind or extra:
            self._malformed(
                key, "not a baaaht message (expected one envelope: BHT1, a kind, a header length)"
            )
            return
        known = self.registry.peers.get(key)
        if known is not None and address is not None and address != known.address:
            self._answer_all(*self.registry.drop_peer(key, "was replaced by another connection"))
        peer = self.registry.touch(key, self.socket_names[key[0]], address, now)
        try:
            if kind == wire.REQUEST:
                self._on_request(peer, envelope, now)
            elif kind in (wire.REPLY, wire.PARTIAL):
                self._on_reply(peer, kind, envelope)
            elif kind == wire.HEARTBEAT:
                self._on_heartbeat(peer, wire.split(envelope)[1])
            elif kind == wire.CANCEL:
                self._on_cancel(peer, wire.split(envelope)[1].decode(errors="replace"))
            elif kind == wire.EVENT:
                self._on_event(peer, *wire.split(envelope), now)
            elif kind == wire.REGISTER:
                self._on_register(peer, wire.split(envelope)[1])
            elif kind == wire.DISCONNECT:
                self._answer_all(*self.registry.drop_peer(key, "disconnected"))
            else:
                self._malformed(key, f"a peer may not send a {wire.KIND_NAMES[kind]}")
        except (msgspec.DecodeError, wire.MalformedFrame) as exc:
            self._malformed(key, f"undecodable {wire.KIND_NAMES[kind]}: {exc}")

    # -- handlers -----------------------------------------------------------------------------

    def _on_request(self, peer: Peer, envelope: bytes, now: float) -> None:
        header_bytes = wire.header_of(envelope)
        header = wire.request_header.decode(header_bytes)
        size = len(envelope) - wire.PREFIX - len(header_bytes)
        if size > self.max_message:
            message = f"message body of {size} bytes exceeds the limit of {self.max_message} bytes"
            self._reply_error(peer.key, header.id, BusError(ErrorCode.RESOURCE_EXHAUSTED, message))
            return
        if header.target.startswith("bus."):
            self._builtin(peer, header, wire.split(envelope)[1], now)
            return
        try:
            request = self.registry.route(peer, header.id, header.target, header.deadline, now)
        except BusError as exc:
            self._reply_error(peer.key, header.id, exc)
            return
        instance = request.instance
        if not self._send(instance.peer.key, envelope, request.token + peer.caller_frame):
            self.registry.complete(instance.peer, request.token, True, ErrorCode.UNAVAILABLE.value)
            message = f"service {instance.service} cannot take more requests (queue full or gone)"
            self._reply_error(peer.key, header.id, BusError(ErrorCode.UNAVAILABLE, message))

    def _on_reply(self, peer: Peer, kind: bytes, envelope: bytes) -> None:
        final = kind == wire.REPLY
        header = wire.reply_header.decode(wire.header_of(envelope))
        if peer.instance is None:
            self._malformed(peer.key, "only a registered service instance may reply")
            return
        request = self.registry.complete(peer, header.token, final, header.error)
        if request is None:
            if not final:  # a stream whose caller is gone: tell the handler to stop
                self._send(peer.key, wire.pack(wire.CANCEL, body=header.token))
            return
        self._send(request.client, envelope)

    def _on_cancel(self, peer: Peer, request_id: str) -> None:
        request = self.registry.cancel(peer.key, request_id)
        if request is not None:
            self._send(request.instance.peer.key, wire.pack(wire.CANCEL, body=request.token))

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
            instance = self.registry.register(peer, registration)
        except BusError as exc:
            self._send(peer.key, wire.pack(wire.DISCONNECT, body=wire.encode(exc.body())))
            return
        log.info("service registered", extra={"service": instance.service, "instance": instance.instance_id})
        self.publish_own(ServiceUp(service=instance.service, instance=instance.instance_id))

    def _on_event(self, peer: Peer, topic_bytes: bytes, body: bytes, now: float) -> None:
        topic = topic_bytes.decode(errors="replace")
        if peer.socket == AGENTS_SOCKET and not topic.startswith(AGENT_TOPICS):
            message = f"agents may publish only {AGENT_TOPICS}* topics, not {topic!r}"
            self._reply_error(peer.key, "", BusError(ErrorCode.PERMISSION_DENIED, message))
            return
        if len(body) > self.max_event:
            message = f"event of {len(body)} bytes exceeds the limit of {self.max_event} bytes"
            self._reply_error(peer.key, "", BusError(ErrorCode.RESOURCE_EXHAUSTED, message))
            return
        self._publish(topic, peer.caller.service or f"{peer.socket}:{peer.caller.peer}", body, now)

    def publish_own(self, event) -> None:
        self._publish(topic_of(type(event)), "bus", wire.encode(event), time.time())

    def _publish(self, topic: str, source: str, body: bytes, now: float) -> None:
        event = self.events.append(topic, source, body, now)
        stamp = wire.encode(wire.EventStamp(event.seq, now, source, self.epoch))
        # PUB never blocks: a subscriber past its high-water mark loses messages, sees a gap and replays.
        self.pub.send_multipart([topic.encode(), wire.pack(wire.EVENT, stamp, body)])

    # -- built-in bus.* methods ---------------------------------------------------------------

    def _builtin(self, peer: Peer, header: wire.RequestHeader, body: bytes, now: float) -> None:
        decoder = _builtin_decoders.get(header.target)
        if peer.socket == AGENTS_SOCKET and header.target not in AGENT_BUILTINS:
            # The event history and the peer list would show agents everything on the host.
            message = f"agents may call only {', '.join(AGENT_BUILTINS)} of the bus.* methods"
            self._reply_error(peer.key, header.id, BusError(ErrorCode.PERMISSION_DENIED, message))
            return
        if decoder is None:
            self._reply_error(
                peer.key, header.id, BusError(ErrorCode.NOT_FOUND, f"no method {header.target!r}")
            )
            return
        try:
            request = decoder.decode(body)
        except msgspec.DecodeError as exc:
            self._reply_error(peer.key, header.id, validation_error(header.target, exc))
            return
        result = self._builtin_result(peer, request, now)
        self._send(peer.key, wire.reply(wire.REPLY, header.id, wire.encode(result)))

    def _builtin_result(self, peer: Peer, request: Request, now: float):
        if isinstance(request, Ping):
            return Pong(
                broker_pid=os.getpid(),
                started_at=self.started_at,
                time=now,
                protocol=wire.PROTOCOL.decode(),
                caller=peer.caller,
            )
        if isinstance(request, ServicesQuery):
            return ServicesList(services=self.registry.services_view(now, request.service))
        if isinstance(request, PeersQuery):
            return PeersList(peers=self.registry.peers_view(now))
        if isinstance(request, StatsQuery):
            return BusStats(
                uptime=now - self.started_at,
                errors=dict(self.errors),
                events_published=self.events.last_seq,
                last_event_seq=self.events.last_seq,
                per_service=dict(self.registry.per_service),
                **self.counters,
            )
        assert isinstance(request, EventsReplay)  # the last of BUILTINS
        events = self.events.replay(request.since, request.topics, min(request.limit, 10_000))
        return ReplayResult(
            events=events, first_seq=self.events.first_seq, last_seq=self.events.last_seq, epoch=self.epoch
        )

    # -- time ---------------------------------------------------------------------------------

    def _tick(self, now: float) -> None:
        before = {key: peer.instance for key, peer in self.registry.peers.items() if peer.instance}
        self._answer_all(*self.registry.expire(now))
        for key, instance in before.items():
            if key not in self.registry.peers:
                log.warning("service instance expired", extra={"service": instance.service})
                self.publish_own(
                    ServiceDown(
                        service=instance.service, instance=instance.instance_id, reason="missed heartbeats"
                    )
                )
        for key in list(self.registry.peers):
            self._send(key, HEARTBEAT)
        stamp = wire.EventStamp(self.events.last_seq, now, "bus", self.epoch)
        self.pub.send_multipart([b"", wire.pack(wire.HEARTBEAT, wire.encode(stamp))])

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

    def _malformed(self, key, message: str) -> None:
        self.counters["malformed"] += 1
        log.warning("malformed message", extra={"peer": key[1].hex(), "problem": message})
        self._reply_error(key, "", BusError(ErrorCode.INVALID_ARGUMENT, message))

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
            if exc.errno not in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                raise
            reason = "unroutable" if exc.errno == zmq.EHOSTUNREACH else "queue_full"
            self.errors[reason] = self.errors.get(reason, 0) + 1
            return False
        self.counters["messages_out"] += 1
        self.counters["bytes_out"] += len(envelope)
        return True


def peer_address(frame: zmq.Frame) -> str | None:
    try:
        return frame.get("Peer-Address")
    except zmq.ZMQError:
        return None


def main(argv: list[str] | None = None) -> None:
    from baaaht.common.config import load_config
    from baaaht.common.logs import setup_logging

    parser = argparse.ArgumentParser(prog="baaaht-broker", description="Run the baaaht bus broker.")
    parser.add_argument("--config", default=os.environ.get("BAAAHT_CONFIG"))
    args = parser.parse_args(argv)
    config, _sources = load_config(args.config)
    setup_logging(config.log, "broker")
    broker = Broker(config)
    broker.bind()
    signal.signal(signal.SIGTERM, broker.stop)
    signal.signal(signal.SIGINT, broker.stop)
    broker.run()


if __name__ == "__main__":
    main()
