"""The event-loop driver of the connection core: the asyncio face's DEALER, on its event loop.

A reply is read on the loop and handed to the coroutine awaiting it there, and a call is sent from
the loop: no thread in between. (On bus/connection.py's I/O thread, every message crossed between
that thread and the loop, a wake-up and a switch of the GIL each way: a good part of a worker's CPU
per task, and of a lease's way to its handler.) The core, and what is done with the socket, are the
other driver's (bus/protocol.py, bus/driver.py); only the waiting differs:

- ZeroMQ's FD only says that something may have changed: on it, or after a send (which can take the
  signal of a message that has arrived meanwhile), the socket is read until it has nothing more;
- heartbeats and liveness run on a loop timer armed for when the core next has something to do;
- events published in one turn of the loop go out as one message (as those waiting in the other
  driver's outbox), and before anything sent after them.
"""

from __future__ import annotations

import asyncio
import time

from baaaht.bus.driver import DealerDriver, EventBatch
from baaaht.bus.errors import BusError
from baaaht.bus.protocol import Call, EventSink, error_reply
from baaaht.schemas.errors import ErrorCode


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
        self._unwatch()
        self._close_dealer()

    # -- the loop's side ----------------------------------------------------------------------

    def _watch(self) -> None:
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
