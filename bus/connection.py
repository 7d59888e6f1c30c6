"""The I/O driver of the connection core: one DEALER owned by a single I/O thread.

The blocking face (bus/client.py) and the services' runner sit on it; the asyncio face drives
its own DEALER on its event loop (bus/aio_connection.py). What both do with the socket is
bus/driver.py's.

ZeroMQ sockets are not thread-safe, so callers never touch the DEALER: they put
messages and calls on one FIFO queue and wake the I/O thread through a pipe; it
forwards them to the broker in that order (so two events published one after the
other from different threads reach the broker in that order). Everything else —
heartbeats, liveness, registration, which call a reply belongs to, what fails when
the broker goes away — is bus/protocol.py's ClientCore, which this thread drives.
"""

from __future__ import annotations

import os
import queue
import threading
import time

import zmq

from baaaht.bus.driver import DealerDriver, EventBatch
from baaaht.bus.protocol import Call, EventSink


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


class Connection(DealerDriver):
    """Thread-safe calls and sends over one broker connection (arguments as ClientCore's)."""

    def __init__(self, endpoint: str, **settings):
        super().__init__(endpoint, **settings)
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()  # envelopes, Calls, _Abandons, _Subscribes
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # Set by a caller that wrote a wake-up, cleared by the I/O thread (after reading the pipe) before
        # it takes the outbox: a burst of sends costs one write(2) and one wake-up, not one each.
        self._woken = False
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="baaaht-bus-io", daemon=True)
        self._thread.start()

    # -- caller side (any thread) -------------------------------------------------------------

    def send(self, envelope: bytes) -> None:
        if self._outbox.empty() and threading.current_thread() is self._thread:
            # From the I/O thread itself (a reply to a call served inline there) with nothing queued
            # before it: straight to the DEALER, without the outbox and a wake-up of this same thread.
            self._send_one(envelope)
            return
        self._put(envelope)

    def start(self, call: Call) -> None:
        if threading.current_thread() is self._thread:
            # Only this thread receives the reply, and it would be waiting for it: no heartbeats, no
            # replies, until the call's deadline. An inline handler (bus/service.py rpc) must not call.
            raise RuntimeError("a call from the connection's own I/O thread would wait for itself")
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
                self._replace_dealer()
                poller = self._poller()
        self._forward_outgoing()  # what was sent before close() still goes out
        self._send_all(core.close())
        self._close_dealer()

    def _poller(self) -> zmq.Poller:
        poller = zmq.Poller()
        poller.register(self._dealer, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        poller.register(self._wake_read, zmq.POLLIN)
        return poller

    def _forward_outgoing(self) -> None:
        try:
            os.read(self._wake_read, 65536)
        except BlockingIOError:
            pass
        self._woken = False  # after the read: a wake-up written from now on is still in the pipe
        core = self.core
        events = EventBatch()  # consecutive events go out as one message, in their order
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
                    self._start_call(item)
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
