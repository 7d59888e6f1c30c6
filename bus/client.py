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

import queue
import time
import uuid
from typing import Any, Iterator

import msgspec

from baaaht.bus import wire
from baaaht.bus.connection import Connection
from baaaht.bus.errors import BusError
from baaaht.bus.subscription import Subscription
from baaaht.common.endpoints import Endpoints
from baaaht.schemas.base import Empty, Event, Request, target_of, topic_of
from baaaht.schemas.config import Config
from baaaht.schemas.errors import ErrorCode

_encode = msgspec.msgpack.Encoder().encode
_decoders: dict[type, msgspec.msgpack.Decoder] = {}


def decoder_for(response_type: type) -> msgspec.msgpack.Decoder:
    decoder = _decoders.get(response_type)
    if decoder is None:
        decoder = _decoders[response_type] = msgspec.msgpack.Decoder(response_type)
    return decoder


def client_settings(config: Config, timeout: float | None = None) -> dict:
    """A host client's arguments from the config: the services socket and the event stream."""
    endpoints = Endpoints.for_config(config.bus)
    return {
        "endpoint": endpoints.services,
        "events_endpoint": endpoints.events,
        "timeout": float(config.bus.call_timeout) if timeout is None else timeout,
        "heartbeat_interval": float(config.bus.heartbeat_interval),
        "liveness": config.bus.heartbeat_liveness,
    }


def response_type_of(request: Request) -> type:
    response = type(request).response
    return Empty if response is type(None) else response


class BusClient:
    def __init__(
        self,
        endpoint: str,
        *,
        events_endpoint: str = "",
        timeout: float = 10.0,
        heartbeat_interval: float = 1.0,
        liveness: int = 3,
        connection: Connection | None = None,
    ):
        self.endpoint = endpoint
        self.events_endpoint = events_endpoint
        self.timeout = timeout
        self.connection = connection or Connection(
            endpoint, heartbeat_interval=heartbeat_interval, liveness=liveness
        )

    @classmethod
    def for_config(cls, config: Config, *, timeout: float | None = None) -> "BusClient":
        return cls(**client_settings(config, timeout))

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
        with self._open(target, body, timeout, correlation_id, stream=False) as call:
            kind, header, result = call.next_reply()
            return result

    def stream(
        self, request: Request, timeout: float | None = None, correlation_id: str = ""
    ) -> Iterator[Any]:
        """Iterate a streaming call's partial results. Closing the iterator cancels the call;
        `timeout` bounds the wait for each next item as well as the whole call's deadline."""
        decode = decoder_for(response_type_of(request)).decode
        with self._open(
            target_of(type(request)), _encode(request), timeout, correlation_id, stream=True
        ) as call:
            while True:
                kind, header, body = call.next_reply()
                if kind == wire.REPLY:
                    return
                yield decode(body)

    def _open(self, target: str, body: bytes, timeout: float | None, correlation_id: str, stream: bool):
        timeout = self.timeout if timeout is None else timeout
        return _Call(self.connection, target, body, timeout, correlation_id or uuid.uuid4().hex, stream)

    # -- events -------------------------------------------------------------------------------

    def publish(self, event: Event, subtopic: str = "") -> None:
        topic = topic_of(type(event)) + (f".{subtopic}" if subtopic else "")
        self.connection.send([wire.pack(wire.EVENT, topic.encode(), _encode(event))])

    def subscribe(
        self, topics: list[str] | None = None, since: int | None = None, epoch: int | None = None
    ) -> Subscription:
        """Live events whose topic starts with one of `topics` (all when empty); with `since`,
        first every kept event after that sequence number (of the broker `epoch`, when given: a
        restarted broker's history is then replayed whole). Gaps are filled by replay."""
        if not self.events_endpoint:
            raise BusError(ErrorCode.FAILED_PRECONDITION, "this client has no events endpoint")
        return Subscription(self, self.events_endpoint, topics or [], since, epoch)


class _Call:
    """One request's life on a connection: send, wait for replies, cancel if abandoned."""

    def __init__(
        self, connection: Connection, target: str, body: bytes, timeout: float, correlation: str, stream: bool
    ):
        self.connection = connection
        self.target = target
        self.request_id = connection.next_id()
        self.deadline = time.time() + timeout
        self.replies = connection.open_call(self.request_id)
        self.finished = False
        connection.send([wire.request(self.request_id, target, self.deadline, correlation, stream, body)])

    def __enter__(self) -> "_Call":
        return self

    def __exit__(self, *exc) -> None:
        self.connection.close_call(self.request_id)
        if not self.finished:
            self.connection.send([wire.pack(wire.CANCEL, body=self.request_id.encode())])

    def next_reply(self):
        # A little grace past the deadline lets the broker's own TIMEOUT reply arrive first.
        wait = self.deadline - time.time() + 0.5
        try:
            kind, header, body = self.replies.get(timeout=max(0.0, wait))
        except queue.Empty:
            self.finished = True
            raise BusError(
                ErrorCode.TIMEOUT, f"no answer to {self.target} from the broker at {self.connection.endpoint}"
            ) from None
        if kind == wire.REPLY:
            self.finished = True
        wire.raise_for_error(header, body)
        return kind, header, body
