"""The blocking bus client: typed calls, streams, publishing and subscriptions.

    with BusClient.for_config(config) as bus:
        session = bus.call(SessionCreate(owner="alice"))
        for chunk in bus.stream(ContainerLogs(id=cid, follow=True)):
            ...
        for delivery in bus.subscribe(["container."]):
            print(delivery.seq, delivery.topic, delivery.event)

Agents use the same client on the agent endpoint.
"""

from __future__ import annotations

import functools
import os
import queue
import time
from typing import Any, Callable, Iterator, Self

import msgspec

from baaaht.bus import curve as bus_curve
from baaaht.bus import wire
from baaaht.bus.connection import Connection
from baaaht.bus.errors import BusError
from baaaht.bus.protocol import Call, Reply
from baaaht.bus.subscription import Subscription
from baaaht.common.endpoints import Endpoints, tcp_endpoints
from baaaht.schemas.base import Empty, Event, Request, target_of, topic_for
from baaaht.schemas.config import Config

_encode = msgspec.msgpack.Encoder().encode
_decoders: dict[type, msgspec.msgpack.Decoder] = {}


def decoder_for(response_type: type) -> msgspec.msgpack.Decoder:
    decoder = _decoders.get(response_type)
    if decoder is None:
        decoder = _decoders[response_type] = msgspec.msgpack.Decoder(response_type)
    return decoder


def client_settings(config: Config, timeout: float | None = None) -> dict:
    """A client's arguments from the config: the services socket and the event stream of the run
    directory, or, with `bus.tcp_key_file` (a peer on another host), the broker's tcp:// sockets
    for the key's role over CURVE."""
    settings = {
        "timeout": float(config.bus.call_timeout) if timeout is None else timeout,
        "heartbeat_interval": float(config.bus.heartbeat_interval),
        "liveness": config.bus.heartbeat_liveness,
    }
    if not config.bus.tcp_key_file:
        endpoints = Endpoints.for_config(config.bus)
        return {"endpoint": endpoints.services, "events_endpoint": endpoints.events, **settings}
    keys = bus_curve.load_client_keys(config.bus.tcp_key_file)
    tcp = tcp_endpoints(config.bus)
    handshake_ms = max(1, round(float(config.bus.tcp_handshake_timeout) * 1000))
    if keys.role in bus_curve.AGENT_ROLES:  # agents take events over their own connection
        return {"endpoint": tcp["agents"], "curve": bus_curve.ClientCurve(keys, handshake_ms), **settings}
    return {
        "endpoint": tcp["services"],
        "events_endpoint": tcp["events"],
        "curve": bus_curve.ClientCurve(keys, handshake_ms),
        **settings,
    }


def response_type_of(request: Request) -> type:
    response = type(request).response
    return Empty if response is type(None) else response


class ClientFace:
    """What both faces of the one connection are made of (BusClient here, AsyncBusClient in
    bus/aio.py): the services endpoint or a connection to share, the event stream's endpoint and
    the default timeout of a call."""

    connection_class: Callable[..., Any] = Connection  # the driver of a connection of the face's own

    def __init__(
        self,
        endpoint: str,
        *,
        events_endpoint: str = "",
        timeout: float = 10.0,
        heartbeat_interval: float = 1.0,
        liveness: int = 3,
        connection: Connection | None = None,
        curve: bus_curve.ClientCurve | None = None,
    ):
        self.endpoint = endpoint
        self.events_endpoint = events_endpoint
        self.timeout = timeout
        self.curve = connection.curve if connection is not None else curve
        self.connection = connection or self.connection_class(
            endpoint, heartbeat_interval=heartbeat_interval, liveness=liveness, curve=curve
        )

    @classmethod
    def for_config(cls, config: Config, *, timeout: float | None = None) -> Self:
        return cls(**client_settings(config, timeout))


class BusClient(ClientFace):
    # Its callers wait on threads of their own, so they may drive the connection while they wait.
    connection_class = functools.partial(Connection, callers_lead=True)

    def __enter__(self) -> "BusClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.connection.close()

    # -- calls --------------------------------------------------------------------------------

    def call(self, request: Request, timeout: float | None = None, correlation_id: str = "") -> Any:
        """Send a request and wait for its typed result; an error reply raises BusError."""
        body = self.call_raw(target_of(type(request)), _encode(request), timeout, correlation_id)
        return decoder_for(response_type_of(request)).decode(body)

    def call_raw(
        self, target: str, body: bytes, timeout: float | None = None, correlation_id: str = ""
    ) -> bytes:
        """A call with an already encoded body; returns the encoded result."""
        call, replies = self._open(target, body, timeout, correlation_id, stream=False)
        with call:
            return _next_reply(call, replies)[2]

    def stream(
        self, request: Request, timeout: float | None = None, correlation_id: str = ""
    ) -> Iterator[Any]:
        """Iterate a streaming call's partial results. Closing the iterator cancels the call;
        `timeout` bounds the wait for each next item as well as the whole call's deadline."""
        decode = decoder_for(response_type_of(request)).decode
        call, replies = self._open(target_of(type(request)), _encode(request), timeout, correlation_id, True)
        with call:
            while True:
                kind, _header, body = _next_reply(call, replies)
                if kind == wire.REPLY:
                    return
                yield decode(body)

    def _open(self, target: str, body: bytes, timeout: float | None, correlation_id: str, stream: bool):
        timeout = self.timeout if timeout is None else timeout
        replies: queue.SimpleQueue[Reply] = queue.SimpleQueue()
        call = self.connection.core.new_call(
            target,
            body,
            timeout,
            correlation_id or os.urandom(16).hex(),
            stream,
            replies.put,
            time.monotonic(),
        )
        return PendingCall(self.connection, call, replies), replies

    # -- events -------------------------------------------------------------------------------

    def publish(self, event: Event, subtopic: str = "") -> None:
        topic = topic_for(event, subtopic)
        self.connection.send(wire.pack(wire.EVENT, topic.encode(), _encode(event)))

    def subscribe(
        self, topics: list[str] | None = None, since: int | None = None, epoch: int | None = None
    ) -> Subscription:
        """Live events whose topic starts with one of `topics` (all when empty); with `since`,
        first every kept event after that sequence number (of the broker `epoch`, when given: a
        restarted broker's history is then replayed whole). Gaps are filled by replay. A client with
        no events endpoint (an agent) gets them on its connection: its own session's only."""
        return Subscription(self, self.events_endpoint, topics or [], since, epoch)


def _next_reply(call: PendingCall, replies: queue.SimpleQueue) -> Reply:
    reply = call.connection.wait_reply(call.call, replies)
    if reply is None:
        raise call.expired()
    return call.take(reply)


class PendingCall:
    """One request's life on a connection, for both faces: send it, take its replies (which
    the call's `deliver` hands to the waiting face), cancel it if abandoned."""

    def __init__(self, connection: Connection, call: Call, replies: queue.SimpleQueue | None = None):
        """`replies`: a blocking caller's, who waits with `connection.wait_reply`."""
        self.connection = connection
        self.call = call
        self.finished = False
        if replies is None:
            connection.start(call)
        else:
            connection.start_waited(call, replies)

    def __enter__(self) -> "PendingCall":
        return self

    def __exit__(self, *exc) -> None:
        if not self.finished:  # given up, cancelled or left early: the broker cancels it at the service
            self.connection.abandon(self.call)

    def wait_time(self) -> float:
        """Seconds left to wait for the next reply."""
        return max(0.0, self.call.expires - time.monotonic())

    def expired(self) -> BusError:
        return self.connection.core.give_up(self.call)

    def take(self, reply: Reply) -> Reply:
        """A reply as received: an error reply raises its BusError."""
        kind, header, body = reply
        if kind == wire.REPLY:
            self.finished = True
        wire.raise_for_error(header, body)
        return reply
