"""The I/O driver of the connection core: one DEALER owned by a single I/O thread.

Both client faces sit on it: bus/client.py (blocking) and bus/aio.py (asyncio).

ZeroMQ sockets are not thread-safe, so callers never touch the DEALER: they put
messages and calls on one FIFO queue and wake the I/O thread through a pipe; it
forwards them to the broker in that order (so two events published one after the
other from different threads reach the broker in that order). Everything else —
heartbeats, liveness, registration, which call a reply belongs to, what fails when
the broker goes away — is bus/protocol.py's ClientCore, which this thread drives.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time
from typing import Callable

import zmq

from baaaht.bus import wire
from baaaht.bus.curve import ClientCurve
from baaaht.bus.dealer import HANDSHAKE_FAILED, close_dealer, monitor_event, new_dealer
from baaaht.bus.errors import BusError
from baaaht.bus.protocol import Call, ClientCore, EventSink
from baaaht.schemas.errors import ErrorBody, ErrorCode

log = logging.getLogger("baaaht.bus")
BATCH = 256  # messages read per wake-up before looking at the outbox again
# The backend's send with int flags: pyzmq's Python-level wrapper and its flag enums cost
# more per call than the send itself (bench/profile_fanout.py).
_send = zmq.backend.Socket.send
NOBLOCK = int(zmq.NOBLOCK)


class _Abandon:
    __slots__ = ("call",)

    def __init__(self, call: Call):
        self.call = call


class _Subscribe:
    """Start (with a sink) or stop (sink None) one of the connection's event subscriptions."""

    __slots__ = ("subscription_id", "prefixes", "sink")

    def __init__(self, subscription_id: int, prefixes: tuple[str, ...] = (), sink: EventSink | None = None):
        self.subscription_id = subscription_id
        self.prefixes = prefixes
        self.sink = sink


class _EventBatch:
    """EVENT envelopes waiting in the outbox, taken as one EVENTS message (or the one EVENT):
    the broker reads, routes and counts one message where there were many."""

    __slots__ = ("envelopes", "size")

    def __init__(self) -> None:
        self.envelopes: list[bytes] = []
        self.size = 0

    def add(self, envelope: bytes) -> bool:
        """Whether the envelope joined the batch (an EVENT, and room for it)."""
        if not envelope.startswith(wire.EVENT) or self.size + 4 + len(envelope) > wire.EVENTS_BATCH_BYTES:
            return False
        self.envelopes.append(envelope)
        self.size += len(envelope) + 4
        return True

    def take(self) -> bytes | None:
        envelopes, self.envelopes, self.size = self.envelopes, [], 0
        if len(envelopes) > 1:
            return wire.batch_of_events(envelopes)
        return envelopes[0] if envelopes else None


class Connection:
    """Thread-safe calls and sends over one broker connection (arguments as ClientCore's)."""

    def __init__(
        self,
        endpoint: str,
        *,
        heartbeat_interval: float = 1.0,
        liveness: int = 3,
        context: zmq.Context | None = None,
        on_message: Callable[[bytes, bytes, list[bytes]], None] | None = None,
        registration: Callable[[], bytes] | None = None,
        health: Callable[[], bytes] | None = None,
        curve: ClientCurve | None = None,
    ):
        self.endpoint = endpoint
        self.curve = curve
        # CURVE: usable once the handshake succeeded; NULL (ipc://): once connected
        self._ready_event = zmq.EVENT_HANDSHAKE_SUCCEEDED if curve is not None else zmq.EVENT_CONNECTED
        self.heartbeat_interval = heartbeat_interval
        self.context = context or zmq.Context.instance()
        self.core = ClientCore(
            endpoint,
            heartbeat_interval=heartbeat_interval,
            liveness=liveness,
            on_message=on_message,
            registration=registration,
            health=health,
        )
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()  # envelopes, Calls, _Abandons, _Subscribes
        self._subscription_ids = itertools.count(1)
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # Set by a caller that wrote a wake-up, cleared by the I/O thread (after reading the pipe) before
        # it takes the outbox: a burst of sends costs one write(2) and one wake-up, not one each.
        self._woken = False
        self._closing = threading.Event()
        self._connected = threading.Event()  # set once the socket has connected (and registered)
        self._dealer, self._monitor = new_dealer(self.context, endpoint, curve)
        self._thread = threading.Thread(target=self._run, name="baaaht-bus-io", daemon=True)
        self._thread.start()

    @property
    def refused(self) -> ErrorBody | None:
        """Set when the broker refused our registration for good."""
        return self.core.refused

    # -- caller side (any thread) -------------------------------------------------------------

    def wait_connected(self, timeout: float) -> bool:
        """Whether the socket has connected within `timeout`; a service's REGISTER was sent by then,
        so whatever is sent after it reaches the broker after the REGISTER."""
        return self._connected.wait(timeout)

    def send(self, envelope: bytes) -> None:
        if self._outbox.empty() and threading.current_thread() is self._thread:
            # From the I/O thread itself (a reply to a call served inline there) with nothing queued
            # before it: straight to the DEALER, without the outbox and a wake-up of this same thread.
            self._send_one(envelope)
            return
        self._put(envelope)

    def start(self, call: Call) -> None:
        self._put(call)

    def abandon(self, call: Call) -> None:
        self._put(_Abandon(call))

    def subscribe(self, prefixes: list[str], sink: EventSink) -> int:
        """Events sent on this connection (an agent's: bus/protocol.py ClientCore.subscribe) go to
        `sink(topic, envelope)` on the I/O thread; the id to `unsubscribe` with."""
        subscription_id = next(self._subscription_ids)
        self._put(_Subscribe(subscription_id, tuple(prefixes), sink))
        return subscription_id

    def unsubscribe(self, subscription_id: int) -> None:
        self._put(_Subscribe(subscription_id))

    def _put(self, item) -> None:
        self._outbox.put(item)
        if not self._woken:  # else the I/O thread has yet to take the outbox: it takes this item too
            self._woken = True
            self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_write, b"\0")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already: the I/O thread is on its way

    def close(self, timeout: float = 2.0) -> None:
        """Send what is queued, then DISCONNECT, and stop; calls still open get CANCELLED."""
        if self._closing.is_set():
            return
        self._closing.set()
        self._wake()
        self._thread.join(timeout)
        os.close(self._wake_read)
        os.close(self._wake_write)

    # -- I/O thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        core = self.core
        poller = self._poller()
        while not self._closing.is_set():
            now = time.monotonic()
            for sock, _ in poller.poll(core.next_timer(now) * 1000):
                if sock == self._wake_read:
                    self._forward_outgoing()
                elif sock is self._monitor:
                    self._on_monitor(time.monotonic())
                else:
                    self._receive()
            beats, replace = core.tick(time.monotonic())
            self._send_all(beats)
            if replace:
                close_dealer(self._dealer, self._monitor)
                self._dealer, self._monitor = new_dealer(self.context, self.endpoint, self.curve)
                poller = self._poller()
        self._forward_outgoing()  # what was sent before close() still goes out
        self._send_all(core.close())
        close_dealer(self._dealer, self._monitor, linger_ms=500)

    def _poller(self) -> zmq.Poller:
        poller = zmq.Poller()
        poller.register(self._dealer, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        poller.register(self._wake_read, zmq.POLLIN)
        return poller

    def _on_monitor(self, now: float) -> None:
        while self._monitor.poll(0):
            event, value = monitor_event(self._monitor.recv_multipart())
            if event == self._ready_event:
                self._send_all(self.core.on_connected(now))
                self._connected.set()
            elif event == zmq.EVENT_DISCONNECTED:
                self.core.on_disconnected(now)
            elif event & HANDSHAKE_FAILED:
                self._on_handshake_failed(event, value, now)

    def _on_handshake_failed(self, event: int, value: int, now: float) -> None:
        """The broker did not take our handshake: calls fail at once, with why (never a silent wait)."""
        key = f"key {self.curve.keys.name!r}" if self.curve is not None else "a NULL handshake"
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            message = (
                f"the broker at {self.endpoint} refused {key} (ZAP status {value}): it is unknown there, "
                "revoked, expired, or not for this socket (`baaaht-ctl auth keys list` on the broker's host)"
            )
            retry = self.heartbeat_interval  # libzmq gives up on the endpoint after a refusal: try anew
        else:
            detail = (
                zmq.Event(value).name if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL else os.strerror(value)
            )
            message = (
                f"the handshake with {self.endpoint} failed ({detail}): a wrong server key "
                f"for {key}, or no baaaht broker with CURVE there"
            )
            retry = None  # libzmq reconnects by itself
        error = BusError(ErrorCode.UNAUTHENTICATED, message, {"broker": self.endpoint})
        self.core.on_handshake_failed(error, now, retry)

    def _forward_outgoing(self) -> None:
        try:
            os.read(self._wake_read, 65536)
        except BlockingIOError:
            pass
        self._woken = False  # after the read: a wake-up written from now on is still in the pipe
        core = self.core
        events = _EventBatch()  # consecutive events go out as one message, in their order
        try:
            for _ in range(1024):
                try:
                    item = self._outbox.get_nowait()
                except queue.Empty:
                    return
                if type(item) is bytes and events.add(item):
                    continue
                self._send_one(events.take())
                if type(item) is bytes:
                    self._send_one(item)
                elif type(item) is Call:
                    envelope = core.start(item)
                    if envelope is None:
                        continue  # refused at once: the broker does not take our handshake
                    try:
                        _send(self._dealer, envelope, NOBLOCK)
                    except zmq.Again:
                        core.fail(
                            item, BusError(ErrorCode.UNAVAILABLE, "the connection to the broker is backed up")
                        )
                elif type(item) is _Subscribe:
                    if item.sink is None:
                        self._send_all(core.unsubscribe(item.subscription_id))
                    else:
                        self._send_all(core.subscribe(item.subscription_id, item.prefixes, item.sink))
                else:
                    cancel = core.abandon(item.call)
                    if cancel is not None:
                        self._send_all((cancel,))
        finally:
            self._send_one(events.take())
        self._wake()  # more is queued: come back to it after reading replies

    def _send_one(self, envelope: bytes | None) -> None:
        if envelope is None:
            return
        try:
            _send(self._dealer, envelope, NOBLOCK)
        except zmq.Again:
            log.warning("dropped a message: the connection to the broker is backed up")

    def _receive(self) -> None:
        core, recv = self.core, self._dealer.recv_multipart
        now = time.monotonic()
        for _ in range(BATCH):
            try:
                frames = recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._send_all(core.receive(frames, now))

    def _send_all(self, envelopes) -> None:
        for envelope in envelopes:
            try:
                _send(self._dealer, envelope, NOBLOCK)
            except zmq.Again:
                pass  # heartbeats and cancels to a broker that is not draining us: liveness will notice
