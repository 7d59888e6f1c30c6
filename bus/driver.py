"""What both I/O drivers of the connection core share: the DEALER, its monitor, and the core.

bus/connection.py drives them from an I/O thread of its own (under the blocking face and the
services' runner); bus/aio_connection.py from the asyncio event loop (under the asyncio face). Each
calls these methods from the one thread that owns the socket; what the broker sends, the socket
monitor reports and the core answers is handled here once.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from typing import Callable

import zmq

from baaaht.bus import wire
from baaaht.bus.curve import ClientCurve
from baaaht.bus.dealer import HANDSHAKE_FAILED, close_dealer, monitor_event, new_dealer
from baaaht.bus.errors import BusError
from baaaht.bus.protocol import Call, ClientCore
from baaaht.schemas.errors import ErrorBody, ErrorCode

log = logging.getLogger("baaaht.bus")
BATCH = 256  # messages read per wake-up before looking at other work again
# The backend's send, recv and get with int flags: pyzmq's Python-level wrappers and their flag enums
# cost more per call than the send itself (bench/profile_fanout.py).
_send, _recv, _get = zmq.backend.Socket.send, zmq.backend.Socket.recv, zmq.backend.Socket.get
NOBLOCK, _EVENTS, _POLLIN, _RCVMORE = int(zmq.NOBLOCK), int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.RCVMORE)
BACKED_UP = "the connection to the broker is backed up"


class EventBatch:
    """EVENT envelopes waiting to be sent, taken as one EVENTS message (or the one EVENT):
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


class DealerDriver:
    """One broker connection's DEALER and monitor around a ClientCore (arguments as ClientCore's)."""

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
        self._subscription_ids = itertools.count(1)
        self._connected = threading.Event()  # set once the socket has connected (and registered)
        self._dealer, self._monitor = new_dealer(self.context, endpoint, curve)

    @property
    def refused(self) -> ErrorBody | None:
        """Set when the broker refused our registration for good."""
        return self.core.refused

    def wait_connected(self, timeout: float) -> bool:
        """Whether the socket has connected within `timeout`; a service's REGISTER was sent by then,
        so whatever is sent after it reaches the broker after the REGISTER."""
        return self._connected.wait(timeout)

    # -- the owning thread only ---------------------------------------------------------------

    def _replace_dealer(self) -> None:
        close_dealer(self._dealer, self._monitor)
        self._dealer, self._monitor = new_dealer(self.context, self.endpoint, self.curve)

    def _close_dealer(self) -> None:
        close_dealer(self._dealer, self._monitor, linger_ms=500)

    def _on_monitor(self, now: float) -> None:
        while _get(self._monitor, _EVENTS) & _POLLIN:  # not poll(0): that builds a Poller each time
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

    def _start_call(self, call: Call) -> None:
        """Track the call and send its REQUEST (or fail it at once: a refused handshake, a full queue)."""
        envelope = self.core.start(call)
        if envelope is None:
            return  # refused at once: the broker does not take our handshake
        try:
            _send(self._dealer, envelope, NOBLOCK)
        except zmq.Again:
            self.core.fail(call, BusError(ErrorCode.UNAVAILABLE, BACKED_UP))

    def _send_one(self, envelope: bytes | None) -> None:
        if envelope is None:
            return
        try:
            _send(self._dealer, envelope, NOBLOCK)
        except zmq.Again:
            log.warning("dropped a message: %s", BACKED_UP)

    def _receive(self) -> bool:
        """Handle what the broker sent, at most BATCH messages; whether more may be waiting.

        The socket's EVENTS says whether a message is waiting, where a recv that finds none raises
        zmq.Again (an exception made for every drain: dearer than the look), and the backend's recv
        skips pyzmq's Python-level recv_multipart."""
        core, dealer = self.core, self._dealer
        now = time.monotonic()
        for _ in range(BATCH):
            if not self._readable():
                return False
            frames = [_recv(dealer, NOBLOCK)]
            while _get(dealer, _RCVMORE):
                frames.append(_recv(dealer, NOBLOCK))
            self._send_all(core.receive(frames, now))
        return True

    def _readable(self) -> bool:
        """Whether a message waits to be read (this also clears the FD's signal: look again after)."""
        return bool(_get(self._dealer, _EVENTS) & _POLLIN)

    def _send_all(self, envelopes) -> None:
        for envelope in envelopes:
            try:
                _send(self._dealer, envelope, NOBLOCK)
            except zmq.Again:
                pass  # heartbeats and cancels to a broker that is not draining us: liveness will notice
