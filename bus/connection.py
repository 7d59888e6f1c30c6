"""The I/O driver of the connection core: one DEALER, driven by one thread at a time.

The blocking face (bus/client.py) and the services' runner sit on it; the asyncio face drives
its own DEALER on its event loop (bus/aio_connection.py). What both do with the socket is
bus/driver.py's.

ZeroMQ sockets are not thread-safe, so one thread at a time leads the connection: it
alone touches the DEALER and drives bus/protocol.py's ClientCore (heartbeats, liveness,
registration, which call a reply belongs to, what fails when the broker goes away).
Other threads put messages and calls on one FIFO queue and wake the leader through a
pipe; it forwards them to the broker in that order (so two events published one after
the other from different threads reach the broker in that order).

The connection's I/O thread leads whenever nobody else does. On a connection whose
blocking callers may lead (`callers_lead`: a BusClient's own), a caller waiting for a
reply leads while it waits when the connection is free, so it sends its request and
reads its reply itself: no hand-off to the I/O thread and back, which cost more CPU than
the call. A leader that got its reply hands the connection to a waiting caller, or to
the I/O thread when something else is in flight or due (a call nobody waits on here, a
subscription, no broker connected, queued messages); else it leaves it free, and the I/O
thread comes back only when a heartbeat is due or something is put on the queue.
"""

from __future__ import annotations

import collections
import os
import queue
import select
import threading
import time

import zmq

from baaaht.bus.driver import DealerDriver, EventBatch
from baaaht.bus.protocol import Call, EventSink

# A blocking caller's queue: its call's replies, and LEAD when the connection is handed to it.
Replies = queue.SimpleQueue
# Put in a waiting caller's replies: the connection is its to lead now (one that finds it led by
# someone else by then was handed it and handed it on already, while it took its reply).
LEAD = object()
IO_THREAD = object()  # the connection's leader when its I/O thread leads
CLOSING = object()  # what a leader's wait comes to when the connection closes under it


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
    """Thread-safe calls and sends over one broker connection (arguments as ClientCore's);
    `callers_lead`: blocking callers waiting in `wait_reply` may drive the socket themselves."""

    def __init__(self, endpoint: str, *, callers_lead: bool = False, **settings):
        super().__init__(endpoint, **settings)
        self.callers_lead = callers_lead
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()  # envelopes, Calls, _Abandons, _Subscribes
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # Set by a caller that wrote a wake-up, cleared by the leader (after reading the pipe) before
        # it takes the outbox: a burst of sends costs one write(2) and one wake-up, not one each.
        self._woken = False
        # Who leads: IO_THREAD, a waiting caller's Replies, or None (nobody: the next to come takes it).
        self._lock = threading.Lock()  # over _leader and _followers
        self._leader: object = IO_THREAD  # the I/O thread first: it sees the socket connect
        self._followers: collections.deque[Replies] = collections.deque()  # callers waiting, oldest first
        self._io_turn = threading.Event()  # set when the connection is handed to the parked I/O thread
        self._watch()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="baaaht-bus-io", daemon=True)
        self._thread.start()

    # -- caller side (any thread) -------------------------------------------------------------

    def send(self, envelope: bytes) -> None:
        if self._outbox.empty() and self._leader is IO_THREAD and threading.current_thread() is self._thread:
            # From the I/O thread itself while it leads (a reply to a call served inline there) with nothing
            # queued before it: straight to the DEALER, without the outbox and a wake-up of this same thread.
            self._send_one(envelope)
            return
        self._put(envelope)

    def start(self, call: Call) -> None:
        self._refuse_from_io_thread()
        self._put(call)

    def start_waited(self, call: Call, replies: Replies) -> None:
        """Send a call whose caller waits for it in `wait_reply` (its replies are delivered to
        `replies`): it sends it itself when the connection is free for it to lead."""
        self._refuse_from_io_thread()
        if self._lead_or_follow(replies, follow=False):
            self._outbox.put(call)  # forwarded by the caller, after everything queued before it
        else:
            self._put(call)

    def wait_reply(self, call: Call, replies: Replies):
        """The next reply delivered to `replies` (a blocking caller's for `call`), or None when none
        came by the call's expiry; the caller leads the connection meanwhile whenever it may."""
        try:
            return self._wait_reply(call, replies)
        except BaseException:
            # An exception from a signal handler (Ctrl-C's KeyboardInterrupt) ended the wait: the
            # connection must be neither left led by this caller nor handed to it later, or nobody
            # would lead it again (no heartbeats, no replies read, every later call timing out).
            if self._stop_following(replies):
                self._step_back(call)
            raise

    def _wait_reply(self, call: Call, replies: Replies):
        while True:
            if self._lead_or_follow(replies):
                reply = self._lead(call, replies)
                if reply is not CLOSING:
                    return reply
                continue  # the I/O thread has it now, to close: wait as a follower for CANCELLED
            try:
                reply = replies.get(timeout=max(0.0, call.expires - time.monotonic()))
            except queue.Empty:
                reply = None
            if self._stop_following(replies):  # handed the connection while this reply came
                if reply is LEAD:
                    continue
                self._step_back(call)
            if reply is not LEAD:  # else one left over from an earlier hand-over: not ours any more
                return reply

    def _refuse_from_io_thread(self) -> None:
        if threading.current_thread() is self._thread:
            # Only this thread receives the reply, and it would be waiting for it: no heartbeats, no
            # replies, until the call's deadline. An inline handler (bus/service.py rpc) must not call.
            raise RuntimeError("a call from the connection's own I/O thread would wait for itself")

    def abandon(self, call: Call) -> None:
        self._put(_Abandon(call))

    def subscribe(self, prefixes: list[str], sink: EventSink) -> int:
        """Events sent on this connection (an agent's: bus/protocol.py ClientCore.subscribe) go to
        `sink(topic, envelope)` on the leading thread; the id to `unsubscribe` with."""
        subscription_id = next(self._subscription_ids)
        self._put(_Subscribe(subscription_id, tuple(prefixes), sink))
        return subscription_id

    def unsubscribe(self, subscription_id: int) -> None:
        self._put(_Subscribe(subscription_id))

    def _put(self, item) -> None:
        self._outbox.put(item)
        with self._lock:
            free = self._leader is None
            if free:
                self._leader = IO_THREAD
        if free:
            self._io_turn.set()  # it forwards the outbox first thing
        elif not self._woken:  # else the leader has yet to take the outbox: it takes this item too
            self._woken = True
            self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_write, b"\0")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already: the leader is on its way

    def close(self, timeout: float = 2.0) -> None:
        """Send what is queued, then DISCONNECT, and stop; calls still open get CANCELLED."""
        if self._closing.is_set():
            return
        self._closing.set()
        self._wake()  # a leader in its poll: it hands the connection to the I/O thread
        self._io_turn.set()
        self._thread.join(timeout)
        os.close(self._wake_read)
        os.close(self._wake_write)

    # -- who leads ----------------------------------------------------------------------------

    def _lead_or_follow(self, replies: Replies, follow: bool = True) -> bool:
        """Whether the connection is this caller's to lead now (taking it if free); if not, with
        `follow`, the caller joins those it may be handed to."""
        if not self.callers_lead:
            return False
        with self._lock:
            if self._leader is replies:
                return True
            if self._closing.is_set():
                return False
            if self._leader is None:
                self._leader = replies
                return True
            if follow:
                self._followers.append(replies)
            return False

    def _stop_following(self, replies: Replies) -> bool:
        """The caller stopped waiting; whether the connection was handed to it meanwhile."""
        if not self.callers_lead:
            return False
        with self._lock:
            if self._leader is replies:
                return True
            try:
                self._followers.remove(replies)
            except ValueError:
                pass  # closing: nobody is handed the connection any more
            return False

    def _step_back(self, waited: Call | None = None) -> None:
        """A leading caller is done for now: hand the connection on."""
        leader = self._pass_on(waited)
        if leader is IO_THREAD:
            self._io_turn.set()
        elif leader is not None:
            leader.put(LEAD)

    def _pass_on(self, waited: Call | None) -> object:
        """Who leads next (see `_next_leader`), for the leader to hand the connection to."""
        with self._lock:
            self._leader = self._next_leader(waited)
            return self._leader

    def _next_leader(self, waited: Call | None) -> object:
        """A waiting caller; else the I/O thread when something needs the connection read (the
        caller of `waited` reads its own when it waits again); else nobody."""
        if self._closing.is_set():
            return IO_THREAD
        if self._followers:
            return self._followers.popleft()
        if not self.callers_lead or not self._outbox.empty() or self.core.busy(waited):
            return IO_THREAD
        return None

    # -- leading ------------------------------------------------------------------------------

    def _lead(self, call: Call, replies: Replies):
        """Drive the connection until a reply for `replies` comes (it), the call expires (None) or the
        connection closes (CLOSING); then hand it on."""
        try:
            self._take_up()
            while True:
                reply = _delivered(replies)
                if reply is not None:
                    return reply
                now = time.monotonic()
                if now >= call.expires:
                    return None
                if self._closing.is_set():
                    return CLOSING
                self._turn(min(call.expires - now, self.core.next_timer(now)))
        finally:
            self._step_back(call)

    def _take_up(self) -> None:
        """A new leader's first steps: what the socket monitor told while nobody led (a disconnect:
        a call then fails as it would have had it been seen at once), then what is queued (a leading
        caller's own call among it)."""
        self._on_monitor(time.monotonic())
        self._forward_outgoing()

    def _run(self) -> None:
        """The I/O thread: it leads while nobody else does and something needs it, else waits."""
        while not self._closing.is_set():
            if self._io_leads():
                self._lead_while_needed()
            # Handed the connection, or time for a heartbeat (a leading caller sends those: then just
            # a look whether it still leads).
            idle = self._leader is None
            self._io_turn.wait(self.core.next_timer(time.monotonic()) if idle else self.heartbeat_interval)
            self._io_turn.clear()
        while not self._io_leads():  # a caller leading: it hands the connection over when it sees the close
            self._io_turn.wait(self.heartbeat_interval)
            self._io_turn.clear()
        self._forward_outgoing()  # what was sent before close() still goes out
        self._send_all(self.core.close())
        self._close_dealer()

    def _lead_while_needed(self) -> None:
        """The I/O thread's turns, until it hands the connection on (or it closes)."""
        self._take_up()
        timeout = 0.0  # a first look (and heartbeat, when due) before it may hand the connection on
        while not self._closing.is_set():
            self._turn(timeout)
            leader = self._pass_on(None)
            if leader is not IO_THREAD:
                if leader is not None:
                    leader.put(LEAD)
                return
            timeout = self.core.next_timer(time.monotonic())

    def _io_leads(self) -> bool:
        """Whether the I/O thread leads (taking the connection if free)."""
        with self._lock:
            if self._leader is None:
                self._leader = IO_THREAD
            return self._leader is IO_THREAD

    def _turn(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for the socket, its monitor or a wake-up and handle what
        comes; then heartbeats and liveness.

        One poll(2) of the sockets' FDs: zmq_poll on the sockets themselves looks at each one's
        EVENTS before and after, a poll(2) and a getpid(2) each, the most of a call's system calls.
        An FD only signals a change, and a send or a read can take the signal of a message that
        arrived meanwhile: hence the look at the DEALER before sleeping; the monitor is read to
        the end whenever it is looked at, so its signal is never taken without its messages."""
        read = self._readable()
        for fd, _ in self._poller.poll(0 if read else timeout * 1000):
            if fd == self._wake_read:
                self._take_wakeups()
                self._forward_outgoing()
            elif fd == self._monitor_fd:
                self._on_monitor(time.monotonic())
            read = True  # the DEALER's FD; or sends, which may have taken its signal
        if read:
            self._receive()
        beats, replace = self.core.tick(time.monotonic())
        self._send_all(beats)
        if replace:
            self._replace_dealer()
            self._watch()
            self._on_monitor(time.monotonic())  # what it said before it was watched: its FD may not tell

    def _watch(self) -> None:
        """Poll the DEALER's FD, its monitor's and the wake pipe."""
        self._monitor_fd = self._monitor.get(zmq.FD)
        self._poller = select.poll()
        for fd in (self._dealer.get(zmq.FD), self._monitor_fd, self._wake_read):
            self._poller.register(fd, select.POLLIN)

    def _take_wakeups(self) -> None:
        try:
            os.read(self._wake_read, 65536)
        except BlockingIOError:
            pass
        self._woken = False  # after the read: a wake-up written from now on is still in the pipe

    def _forward_outgoing(self) -> None:
        core = self.core
        events = EventBatch()  # consecutive events go out as one message, in their order
        try:
            for _ in range(1024):
                if self._outbox.empty():  # only the leader takes: not empty, so get_nowait has one
                    return
                item = self._outbox.get_nowait()
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


def _delivered(replies: Replies):
    """A reply already in `replies` (LEADs there are stale: the caller leads already), or None."""
    while not replies.empty():
        reply = replies.get_nowait()
        if reply is not LEAD:
            return reply
    return None
