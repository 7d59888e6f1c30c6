"""One DEALER connection to the broker, owned by a single I/O thread.

ZeroMQ sockets are not thread-safe, so callers never touch the DEALER: they
put messages on one FIFO queue and wake the I/O thread through a pipe; it
forwards them to the broker in that order (so two events published one after
the other from different threads reach the broker in that order) and hands
replies back through per-call queues. The same thread sends heartbeats, notices
a silent broker, rebuilds the socket (Paranoid Pirate) and registers again, so
neither clients nor services need a restart when the broker comes back.
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
from baaaht.schemas.errors import ErrorBody, ErrorCode

log = logging.getLogger("baaaht.bus")


class Connection:
    """Thread-safe sending and per-call reply queues over one broker connection.

    `on_message(kind, envelope, extra)` receives REQUEST and CANCEL messages (services only);
    `registration()` returns a REGISTER body to (re)send after each (re)connect;
    `health()` returns a HEARTBEAT body for registered services.
    """

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
    ):
        self.endpoint = endpoint
        self.heartbeat_interval = heartbeat_interval
        self.liveness = liveness
        self.context = context or zmq.Context.instance()
        self._on_message = on_message
        self._registration = registration
        self._health = health
        self._pending: dict[str, queue.SimpleQueue] = {}
        self._ids = itertools.count(1)
        self._outbox: queue.SimpleQueue[list[bytes]] = queue.SimpleQueue()
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._closing = threading.Event()
        self.broker_seen = 0.0  # when the broker last spoke to us; 0 until it has
        self.refused: ErrorBody | None = None  # set when the broker refused our registration for good
        self._dealer = self._new_dealer()
        self._thread = threading.Thread(target=self._run, name="baaaht-bus-io", daemon=True)
        self._thread.start()

    # -- caller side (any thread) -------------------------------------------------------------

    def next_id(self) -> str:
        return format(next(self._ids), "x")

    def open_call(self, request_id: str) -> queue.SimpleQueue:
        replies: queue.SimpleQueue = queue.SimpleQueue()
        self._pending[request_id] = replies
        return replies

    def close_call(self, request_id: str) -> None:
        self._pending.pop(request_id, None)

    def send(self, frames: list[bytes]) -> None:
        self._outbox.put(frames)
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_write, b"\0")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already: the I/O thread is on its way

    def close(self, timeout: float = 2.0) -> None:
        if self._closing.is_set():
            return
        self._closing.set()
        self._thread.join(timeout)
        os.close(self._wake_read)
        os.close(self._wake_write)

    # -- I/O thread ---------------------------------------------------------------------------

    def _new_dealer(self) -> zmq.Socket:
        dealer = self.context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.SNDHWM, 100_000)
        dealer.setsockopt(zmq.RCVHWM, 100_000)
        dealer.setsockopt(zmq.RECONNECT_IVL, 100)
        dealer.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        dealer.connect(self.endpoint)
        if self._registration is not None:
            dealer.send(wire.pack(wire.REGISTER, body=self._registration()))
        return dealer

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._dealer, zmq.POLLIN)
        poller.register(self._wake_read, zmq.POLLIN)
        last_heard = time.monotonic()
        next_beat = 0.0
        while not self._closing.is_set():
            timeout = max(0.0, min(next_beat - time.monotonic(), 0.1))
            for sock, _ in poller.poll(timeout * 1000):
                if sock == self._wake_read:
                    self._forward_outgoing()
                else:
                    last_heard = time.monotonic()
                    self._receive()
            now = time.monotonic()
            if now >= next_beat:
                self._heartbeat()
                next_beat = now + self.heartbeat_interval
            # Only a broker we have heard from can go silent; before that, ZeroMQ keeps connecting.
            if self.broker_seen and now - last_heard > self.heartbeat_interval * self.liveness:
                poller.unregister(self._dealer)
                self._reconnect()
                poller.register(self._dealer, zmq.POLLIN)
                last_heard = time.monotonic()
        self._forward_outgoing()  # what was sent before close() still goes out
        self._dealer.close(linger=500)
        self._fail_pending(ErrorCode.CANCELLED, "the connection was closed")

    def _forward_outgoing(self) -> None:
        try:
            os.read(self._wake_read, 65536)
        except BlockingIOError:
            pass
        for _ in range(1024):
            try:
                frames = self._outbox.get_nowait()
            except queue.Empty:
                return
            try:
                self._dealer.send_multipart(frames, zmq.NOBLOCK)
            except zmq.Again:
                self._fail_one(frames, "the connection to the broker is backed up")
        self._wake()  # more is queued: come back to it after reading replies

    def _fail_one(self, frames: list[bytes], message: str) -> None:
        if wire.kind_of(frames[0]) == wire.REQUEST:
            request_id = wire.request_header.decode(wire.header_of(frames[0])).id
            self._deliver(request_id, _error_reply(request_id, ErrorCode.UNAVAILABLE, message))

    def _receive(self) -> None:
        for _ in range(256):
            try:
                frames = self._dealer.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.broker_seen = time.time()
            envelope = frames[0]
            kind = wire.kind_of(envelope)
            if kind in (wire.REPLY, wire.PARTIAL):
                header_bytes, body = wire.split(envelope)
                header = wire.reply_header.decode(header_bytes)
                if header.id:
                    self._deliver(header.id, (kind, header, body))
                else:
                    error = wire.error_body.decode(body)
                    log.warning("the broker refused a message", extra={"error": error.message})
            elif kind == wire.DISCONNECT:
                self._on_disconnect(wire.error_body.decode(wire.split(envelope)[1]))
            elif kind in (wire.REQUEST, wire.CANCEL) and self._on_message is not None:
                self._on_message(kind, envelope, frames[1:])
            elif kind != wire.HEARTBEAT:
                log.warning("ignored a malformed message from the broker")

    def _on_disconnect(self, error: ErrorBody) -> None:
        if self._registration is None:
            return
        if error.code == ErrorCode.UNAVAILABLE:  # the broker forgot us: register again
            log.info("registering again", extra={"reason": error.message})
            self._dealer.send(wire.pack(wire.REGISTER, body=self._registration()))
        else:
            self.refused = error
            log.error("registration refused", extra={"code": error.code.value, "reason": error.message})

    def _deliver(self, request_id: str, reply) -> None:
        replies = self._pending.get(request_id)
        if replies is not None:
            replies.put(reply)

    def _heartbeat(self) -> None:
        beat = wire.pack(wire.HEARTBEAT, body=self._health() if self._health is not None else b"")
        try:
            self._dealer.send(beat, zmq.NOBLOCK)
        except zmq.Again:
            pass  # the broker is not draining us: liveness will notice

    def _reconnect(self) -> None:
        log.warning("broker silent: reconnecting", extra={"endpoint": self.endpoint})
        # Whatever was sent before is lost with the old broker or the old socket.
        self._fail_pending(ErrorCode.UNAVAILABLE, f"lost the broker at {self.endpoint}")
        self.broker_seen = 0.0
        self._dealer.close(linger=0)
        self._dealer = self._new_dealer()

    def _fail_pending(self, code: ErrorCode, message: str) -> None:
        for request_id in list(self._pending):
            self._deliver(request_id, _error_reply(request_id, code, message))


def _error_reply(request_id: str, code: ErrorCode, message: str):
    body = wire.encode(ErrorBody(code=code, message=message))
    return wire.REPLY, wire.ReplyHeader(request_id, code.value), body
