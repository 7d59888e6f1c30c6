"""The peer side of the bus protocol, without sockets: one state machine for every client.

The I/O driver (bus/connection.py: the DEALER and its socket monitor, driven by one thread
at a time, under the blocking face; bus/aio_connection.py: the event loop, under the asyncio
face) tells this core what happened: a
message from the broker, the socket connected or disconnected, time passed (`now` is
always `time.monotonic()`). The core answers with the envelopes to send and delivers
replies to the calls in flight, so heartbeats, liveness, re-registration and the
bookkeeping of calls are written once. Everything that changes the core runs on the
driver's thread (bus/connection.py: the one leading the connection); only `new_call` and
`give_up` may run on a caller's thread (they read).

Failure, as docs/PROTOCOL.md describes it:
- the socket disconnects (the broker died: on ipc the kernel tells at once): calls in
  flight are answered UNAVAILABLE; ZeroMQ reconnects by itself and, once connected, a
  service registers again;
- the broker is connected but silent for `liveness` heartbeat intervals (it hangs):
  calls in flight are answered UNAVAILABLE and the face replaces the socket;
- a call that gets no reply by its deadline (the broker answers TIMEOUT at the deadline
  itself) is given up `DEADLINE_GRACE` later: TIMEOUT while connected, UNAVAILABLE
  (`broker_unreachable`) while the broker is away.
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Callable

from baaaht.bus import wire
from baaaht.bus.errors import BusError
from baaaht.schemas.errors import ErrorBody, ErrorCode

log = logging.getLogger("baaaht.bus")

DEADLINE_GRACE = 0.25  # past the deadline, the broker's own TIMEOUT reply is overdue
HEARTBEAT = wire.pack(wire.HEARTBEAT)
DISCONNECT = wire.pack(wire.DISCONNECT)
NOTHING: tuple[bytes, ...] = ()

Reply = tuple[bytes, wire.ReplyHeader, bytes]  # (REPLY or PARTIAL, header, body)
EventSink = Callable[[bytes, bytes], None]  # (topic, envelope) of an event sent on the connection


class Call:
    """One request in flight: its envelope, when its caller gives up, where its replies go."""

    __slots__ = ("id", "target", "envelope", "expires", "deliver")

    def __init__(self, request_id: str, target: str, envelope: bytes, expires: float, deliver):
        self.id = request_id
        self.target = target
        self.envelope = envelope
        self.expires = expires  # monotonic: the deadline plus DEADLINE_GRACE
        self.deliver: Callable[[Reply], None] = deliver


def broker_unreachable(endpoint: str, what: str) -> BusError:
    """UNAVAILABLE because no broker is connected; `details.broker` names the endpoint tried."""
    return BusError(
        ErrorCode.UNAVAILABLE, f"{what}: no broker is connected at {endpoint}", {"broker": endpoint}
    )


def is_broker_unreachable(error: BusError) -> bool:
    """True for the client's own "no broker connected" error, as opposed to one the broker sent."""
    return error.code == ErrorCode.UNAVAILABLE and "broker" in error.details


def error_reply(request_id: str, error: BusError) -> Reply:
    return wire.REPLY, wire.ReplyHeader(request_id, error.code.value), wire.encode(error.body())


class ClientCore:
    """Calls, heartbeats, liveness and registration of one connection to the broker.

    `on_message(kind, envelope, extra_frames)` receives REQUEST and CANCEL (services only);
    `registration()` returns the REGISTER body sent on every connect; `health()` the
    HEARTBEAT body of a registered service.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        heartbeat_interval: float = 1.0,
        liveness: int = 3,
        on_message: Callable[[bytes, bytes, list[bytes]], None] | None = None,
        registration: Callable[[], bytes] | None = None,
        health: Callable[[], bytes] | None = None,
        wall_clock: Callable[[], float] = time.time,
    ):
        self.endpoint = endpoint
        self.heartbeat_interval = heartbeat_interval
        self.silence_limit = heartbeat_interval * liveness
        self._on_message = on_message
        self._registration = registration
        self._health = health
        self._wall_clock = wall_clock  # the wire deadline is absolute Unix time
        self._ids = itertools.count(1)
        self._calls: dict[str, Call] = {}
        self.connected = False  # per the socket monitor (and liveness)
        self.refused: ErrorBody | None = None  # the broker refused our registration for good
        self.handshake_error: BusError | None = None  # the last handshake failed (CURVE), and why
        self._retry_at: float | None = None  # when to try a refused handshake again (a new socket)
        self.last_heard = 0.0
        self.next_beat = 0.0
        # An agent's subscriptions on its own connection (it has no event socket): id -> (prefixes, sink)
        self._subscriptions: dict[int, tuple[tuple[str, ...], EventSink]] = {}

    # -- calls --------------------------------------------------------------------------------

    def new_call(
        self,
        target: str,
        body: bytes,
        timeout: float,
        correlation: str,
        stream: bool,
        deliver: Callable[[Reply], None],
        now: float,
    ) -> Call:
        """A call ready to `start` (safe on any thread: it changes nothing)."""
        request_id = format(next(self._ids), "x")
        envelope = wire.request(request_id, target, self._wall_clock() + timeout, correlation, stream, body)
        return Call(request_id, target, envelope, now + timeout + DEADLINE_GRACE, deliver)

    def start(self, call: Call) -> bytes | None:
        """Track the call; returns its REQUEST envelope to send, or None when it was failed at once
        because the broker does not take our handshake."""
        if self.handshake_error is not None and not self.connected:
            call.deliver(error_reply(call.id, self.handshake_error))
            return None
        self._calls[call.id] = call
        return call.envelope

    def abandon(self, call: Call) -> bytes | None:
        """The caller stopped waiting (left a stream, gave up): the CANCEL to send, if any is due."""
        if self._calls.pop(call.id, None) is None or not self.connected:
            return None
        return wire.pack(wire.CANCEL, body=call.id.encode())

    def give_up(self, call: Call) -> BusError:
        """The error for a call whose time ran out with no reply (safe on any thread)."""
        if not self.connected:
            if self.handshake_error is not None:
                return self.handshake_error
            return broker_unreachable(self.endpoint, f"{call.target} got no reply")
        return BusError(ErrorCode.TIMEOUT, f"{call.target} got no reply by its deadline")

    def fail(self, call: Call, error: BusError) -> None:
        """Answer one call with an error of the face's own (its send failed)."""
        if self._calls.pop(call.id, None) is not None:
            call.deliver(error_reply(call.id, error))

    def busy(self, waited: Call | None = None) -> bool:
        """Whether something needs the connection read now: a call in flight other than `waited`
        (its caller reads for itself when it waits again), an event subscription, a service's
        requests, or no broker connected yet (the connect is to be seen)."""
        others = len(self._calls) - (waited is not None and waited.id in self._calls)
        return others > 0 or bool(self._subscriptions) or self._on_message is not None or not self.connected

    def _fail_all(self, error: BusError) -> None:
        calls, self._calls = self._calls, {}
        for call in calls.values():
            call.deliver(error_reply(call.id, error))

    # -- what the broker sends ----------------------------------------------------------------

    def receive(self, frames: list[bytes], now: float) -> tuple[bytes, ...]:
        """Handle one message from the broker; returns envelopes to send in answer."""
        self.last_heard = now
        envelope = frames[0]
        kind = wire.kind_of(envelope)
        if kind == wire.REPLY or kind == wire.PARTIAL:
            header_bytes, body = wire.split(envelope)
            header = wire.reply_header.decode(header_bytes)
            if not header.id:
                log.warning(
                    "the broker refused a message", extra={"error": wire.error_body.decode(body).message}
                )
                return NOTHING
            call = self._calls.pop(header.id, None) if kind == wire.REPLY else self._calls.get(header.id)
            if call is not None:
                call.deliver((kind, header, body))
        elif kind == wire.EVENT or (kind == wire.HEARTBEAT and len(envelope) > wire.PREFIX):
            # An event of the agent's subscription ([envelope, topic]), or the broker's stamped heartbeat
            # (the last matching seq): every subscription judges it (bus/subscription.py EventOrder).
            topic = frames[1] if len(frames) > 1 else b""
            for _prefixes, sink in self._subscriptions.values():
                sink(topic, envelope)
        elif kind == wire.DISCONNECT:
            return self._disconnected_by_broker(wire.error_body.decode(wire.split(envelope)[1]))
        elif (kind == wire.REQUEST or kind == wire.CANCEL) and self._on_message is not None:
            self._on_message(kind, envelope, frames[1:])
        elif kind != wire.HEARTBEAT:
            log.warning("ignored a malformed message from the broker")
        return NOTHING

    def _disconnected_by_broker(self, error: ErrorBody) -> tuple[bytes, ...]:
        if self._registration is None:
            return NOTHING
        if error.code == ErrorCode.UNAVAILABLE:  # the broker forgot us: register again
            log.info("registering again", extra={"reason": error.message})
            return (self._register(),)
        self.refused = error
        log.error("registration refused", extra={"code": error.code.value, "reason": error.message})
        return NOTHING

    def _register(self) -> bytes:
        return wire.pack(wire.REGISTER, body=self._registration())

    # -- events on the connection (agents) ----------------------------------------------------

    def subscribe(
        self, subscription_id: int, prefixes: tuple[str, ...], sink: EventSink
    ) -> tuple[bytes, ...]:
        """Have the broker send the events whose topic starts with one of `prefixes` (all, when none)
        on this connection; returns the SUBSCRIBE to send (again on every connect)."""
        self._subscriptions[subscription_id] = (prefixes or ("",), sink)
        return (self._subscribe(),) if self.connected else NOTHING

    def unsubscribe(self, subscription_id: int) -> tuple[bytes, ...]:
        if self._subscriptions.pop(subscription_id, None) is None or not self.connected:
            return NOTHING
        return (self._subscribe(),)

    def _subscribe(self) -> bytes:
        """One SUBSCRIBE with the union of every subscription's prefixes (none: stop)."""
        prefixes = sorted({p for prefixes, _sink in self._subscriptions.values() for p in prefixes})
        return wire.pack(wire.SUBSCRIBE, body=wire.encode(prefixes))

    # -- the socket ---------------------------------------------------------------------------

    def on_connected(self, now: float) -> tuple[bytes, ...]:
        """The socket (re)connected to a broker: register (services), heartbeat from now on."""
        self.connected = True
        self.handshake_error = self._retry_at = None
        self.last_heard = now
        self.next_beat = now
        sends = (self._register(),) if self._registration is not None else NOTHING
        return sends + ((self._subscribe(),) if self._subscriptions else NOTHING)

    def on_disconnected(self, now: float) -> None:
        """The socket lost the broker (ZeroMQ reconnects by itself): nothing in flight will be answered."""
        if self.connected:
            log.warning("lost the broker", extra={"endpoint": self.endpoint})
        self.connected = False
        self._fail_all(broker_unreachable(self.endpoint, "lost the broker"))

    def on_handshake_failed(self, error: BusError, now: float, retry_after: float | None) -> None:
        """The broker did not take our handshake: what is in flight, and what is called until one
        succeeds, fails with `error`; after `retry_after` seconds (when given) the socket is replaced."""
        if self.handshake_error is None:  # the first since the last success: a retrying client logs once
            log.warning("handshake failed", extra={"endpoint": self.endpoint, "error": error.message})
        self.handshake_error = error
        self._retry_at = None if retry_after is None else now + retry_after
        self._fail_all(error)

    def tick(self, now: float) -> tuple[tuple[bytes, ...], bool]:
        """(heartbeats to send, whether to replace the socket: a connected broker fell silent, or a
        refused handshake is due to be tried again)."""
        if not self.connected:
            if self._retry_at is not None and now >= self._retry_at:
                self._retry_at = None
                return NOTHING, True
            return NOTHING, False
        if now - self.last_heard > self.silence_limit:
            log.warning("broker silent: reconnecting", extra={"endpoint": self.endpoint})
            self.on_disconnected(now)
            return NOTHING, True
        if now < self.next_beat:
            return NOTHING, False
        self.next_beat = now + self.heartbeat_interval
        return (wire.pack(wire.HEARTBEAT, body=self._health()) if self._health else HEARTBEAT,), False

    def next_timer(self, now: float) -> float:
        """Seconds until `tick` has something to do (at most one heartbeat interval)."""
        if not self.connected:
            return self.heartbeat_interval
        due = min(self.next_beat, self.last_heard + self.silence_limit + 0.001)
        return max(0.0, due - now)

    def close(self) -> tuple[bytes, ...]:
        """Leave: calls in flight are answered CANCELLED; returns the DISCONNECT to send."""
        self._fail_all(BusError(ErrorCode.CANCELLED, "the connection was closed"))
        was_connected, self.connected = self.connected, False
        return (DISCONNECT,) if was_connected else NOTHING
