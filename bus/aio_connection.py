"""The event-loop driver of the connection core: the asyncio face's DEALER, on its event loop.

A reply is read on the loop and handed to the coroutine awaiting it there, and a call is sent from
the loop: no thread in between. (On bus/connection.py's I/O thread, every message crossed between
that thread and the loop, a wake-up and a switch of the GIL each way: a good part of a worker's CPU
per task, and of a lease's way to its handler.) The core, and what is done with the socket, are the
other driver's (bus/protocol.py, bus/driver.py); only the waiting differs:

- ZeroMQ's FD only says that something may have changed: on it, or after a send (which can take the
  signal of a message that has arrived meanwhile), the socket is read until it has nothing more;
- heartbeats and liveness run on a loop timer armed for when the core next has something to do;
  while the loop is held up (a handler doing blocking work on it), a keep-alive thread sends the
  heartbeats instead, so the broker does not drop us (failing our calls in flight, forgetting an
  agent's subscription) for what is only a busy loop; the DEALER is used under a lock for that;
- events published in one turn of the loop go out as one message (as those waiting in the other
  driver's outbox), and before anything sent after them.
"""

from __future__ import annotations

import asyncio
import threading
import time

from baaaht.bus.driver import DealerDriver, EventBatch
from baaaht.bus.errors import BusError
from baaaht.bus.protocol import HEARTBEAT, Call, EventSink, error_reply
from baaaht.schemas.errors import ErrorCode

# The keep-alive thread looks this often (in heartbeat intervals), and sends a heartbeat when the loop's
# own timer is this late: the broker then hears from us at least every 1.75 intervals.
KEEP_ALIVE_LOOK = 0.5
KEEP_ALIVE_LATE = 1.25


def _locked(method):
    """`method` of the DEALER, under the lock the keep-alive thread takes too."""

    def locked(self, *args):
        with self._socket_lock:
            return method(self, *args)

    return locked


class LoopConnection(DealerDriver):
    """Calls and sends over one broker connection from one event loop (arguments as ClientCore's):
    the running loop it is made on, or else the first one that uses it."""

    def __init__(self, endpoint: str, **settings):
        super().__init__(endpoint, **settings)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watched: tuple[int, int] = ()  # the FDs given to the loop (the DEALER's, its monitor's)
        self._timer: asyncio.TimerHandle | None = None
        self._read_soon = False  # a read of the DEALER is scheduled
        self._events = EventBatch()  # published this turn of the loop, not sent yet
        self._closed = False
        self._socket_lock = threading.RLock()  # the loop's uses of the DEALER, and the keep-alive's
        self._ticked = time.monotonic()  # when the loop last ran its timer (heartbeats, liveness)
        self._keeping_alive = threading.Event()  # set: the keep-alive thread stops
        threading.Thread(target=self._keep_alive, name="baaaht-bus-keepalive", daemon=True).start()
        try:
            self.bind()
        except RuntimeError:
            pass  # made outside a loop: bound to the first that uses it

    def bind(self) -> None:
        """Bind to the running loop (once; every use comes from that loop)."""
        loop = asyncio.get_running_loop()
        if self._loop is loop or self._closed:
            return
        if self._loop is not None:
            raise RuntimeError("this bus connection belongs to another event loop")
        self._loop = loop
        self._watch()
        self._tick()

    # -- the face's side (on the loop) --------------------------------------------------------

    def send(self, envelope: bytes) -> None:
        self.bind()
        if self._closed:
            return  # as the other driver's outbox after its close: never sent
        if self._events.add(envelope):
            if len(self._events.envelopes) == 1:
                self._loop.call_soon(self._flush_events)
            return
        self._flush_events()
        self._send_one(envelope)
        self._look_for_replies()

    def start(self, call: Call) -> None:
        self.bind()
        if self._closed:
            call.deliver(error_reply(call.id, BusError(ErrorCode.CANCELLED, "the connection was closed")))
            return
        self._flush_events()
        self._start_call(call)
        self._look_for_replies()

    def abandon(self, call: Call) -> None:
        if self._closed:
            return
        self._flush_events()
        cancel = self.core.abandon(call)
        if cancel is not None:
            self._send_all((cancel,))
            self._look_for_replies()

    def subscribe(self, prefixes: list[str], sink: EventSink) -> int:
        """Events sent on this connection (an agent's: bus/protocol.py ClientCore.subscribe) go to
        `sink(topic, envelope)` on the loop; the id to `unsubscribe` with."""
        self.bind()
        subscription_id = next(self._subscription_ids)
        self._flush_events()
        self._send_all(self.core.subscribe(subscription_id, tuple(prefixes), sink))
        self._look_for_replies()
        return subscription_id

    def unsubscribe(self, subscription_id: int) -> None:
        if self._closed:
            return
        self._flush_events()
        self._send_all(self.core.unsubscribe(subscription_id))
        self._look_for_replies()

    def close(self) -> None:
        """Send what is queued, then DISCONNECT; calls still open get CANCELLED."""
        if self._closed:
            return
        self._flush_events()
        self._send_all(self.core.close())
        self._closed = True
        self._keeping_alive.set()
        self._unwatch()
        self._close_dealer()

    # -- the loop's side ----------------------------------------------------------------------

    _send_one = _locked(DealerDriver._send_one)
    _send_all = _locked(DealerDriver._send_all)
    _start_call = _locked(DealerDriver._start_call)
    _receive = _locked(DealerDriver._receive)
    _readable = _locked(DealerDriver._readable)
    _replace_dealer = _locked(DealerDriver._replace_dealer)
    _close_dealer = _locked(DealerDriver._close_dealer)

    def _watch(self) -> None:
        with self._socket_lock:
            self._watched = (self._dealer.FD, self._monitor.FD)
        self._loop.add_reader(self._watched[0], self._read)
        self._loop.add_reader(self._watched[1], self._on_monitor_signal)
        self._read()  # what arrived before the loop watched
        self._on_monitor(time.monotonic())

    def _unwatch(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for fd in self._watched:
            self._loop.remove_reader(fd)
        self._watched = ()

    def _read(self) -> None:
        self._read_soon = False
        if self._closed:
            return
        if self._receive():  # a batch, and maybe more: the rest after what else is ready on the loop
            self._read_soon = True
            self._loop.call_soon(self._read)

    def _look_for_replies(self) -> None:
        """After a send: ZeroMQ may have taken the FD's signal of a message waiting to be read."""
        if not self._read_soon and self._readable():
            self._read_soon = True
            self._loop.call_soon(self._read)

    def _on_monitor_signal(self) -> None:
        self._on_monitor(time.monotonic())
        self._tick()  # (dis)connected: heartbeats start, or a refused handshake is retried, from now

    def _tick(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._closed:
            return
        self._ticked = time.monotonic()
        # What came while the loop was held up first: the broker's word may be waiting there, unread,
        # when the liveness below would find it silent.
        self._read()
        beats, replace = self.core.tick(time.monotonic())
        self._send_all(beats)
        if replace:
            self._unwatch()
            self._replace_dealer()
            self._watch()
        else:
            self._look_for_replies()
        self._timer = self._loop.call_later(self.core.next_timer(time.monotonic()), self._tick)

    def _flush_events(self) -> None:
        envelope = self._events.take()
        if envelope is not None:
            self._send_one(envelope)
            self._look_for_replies()

    # -- the keep-alive thread ----------------------------------------------------------------

    def _keep_alive(self) -> None:
        """Heartbeats while the loop is held up: its timer would send them, were it running."""
        interval = self.heartbeat_interval
        while not self._keeping_alive.wait(interval * KEEP_ALIVE_LOOK):
            loop = self._loop
            if (
                loop is None
                or not self.core.connected
                or time.monotonic() - self._ticked < interval * KEEP_ALIVE_LATE
            ):
                continue
            with self._socket_lock:
                if self._closed:
                    return
                self._send_all((HEARTBEAT,))
            try:  # the send may have taken the FD's signal of a message come meanwhile
                loop.call_soon_threadsafe(self._look_for_replies)
            except RuntimeError:
                return  # the loop is closed: nobody uses this connection any more
