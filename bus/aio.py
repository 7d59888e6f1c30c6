"""The asyncio face of the connection core: the blocking client's contract on an event loop.

    async with AsyncBusClient.for_config(config) as bus:
        session = await bus.call(SessionGet(id=sid))
        async for chunk in bus.stream(ContainerLogs(id=cid, follow=True)):
            ...
        async for delivery in bus.subscribe(["session.message"]):
            ...

The connection is bus/protocol.py's ClientCore driven on the event loop itself
(bus/aio_connection.py), so reconnecting, heartbeats, liveness and the bookkeeping of
calls exist once, shared with the blocking client; replies are handed to their awaiting
coroutines on the loop, and calls, cancels and events never block it (non-blocking sends).
"""

from __future__ import annotations

import asyncio
import os
import time
from functools import partial
from typing import Any, AsyncIterator, Callable

import msgspec
import zmq.asyncio

from baaaht.bus import wire
from baaaht.bus.aio_connection import LoopConnection
from baaaht.bus.client import ClientFace, PendingCall, decoder_for, response_type_of
from baaaht.bus.errors import BusError
from baaaht.bus.protocol import Reply
from baaaht.bus.subscription import Delivery, EventOrder, ReplayRetry, sub_socket
from baaaht.schemas.base import Event, Request, target_of, topic_for
from baaaht.schemas.bus import BusEventsReplay, ReplayResult

_encode = msgspec.msgpack.Encoder().encode


class AsyncBusClient(ClientFace):
    connection_class = LoopConnection

    def __init__(self, endpoint: str, **settings: Any):
        super().__init__(endpoint, **settings)
        self.context = zmq.asyncio.Context.instance()  # for the subscriptions' SUB sockets

    @property
    def connected(self) -> bool:
        """Whether a broker is connected now (the socket monitor's view, and liveness)."""
        return self.connection.core.connected

    async def __aenter__(self) -> "AsyncBusClient":
        self.connection.bind()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        """DISCONNECT from the broker; calls still open get CANCELLED."""
        self.connection.close()

    # -- calls --------------------------------------------------------------------------------

    async def call(self, request: Request, timeout: float | None = None, correlation_id: str = "") -> Any:
        body = await self.call_raw(target_of(type(request)), _encode(request), timeout, correlation_id)
        return decoder_for(response_type_of(request)).decode(body)

    async def call_raw(
        self, target: str, body: bytes, timeout: float | None = None, correlation_id: str = ""
    ) -> bytes:
        answered = asyncio.get_running_loop().create_future()
        with self._open(target, body, timeout, correlation_id, False, partial(_settle, answered)) as call:
            return call.take(await _answer(call, answered))[2]

    async def stream(
        self, request: Request, timeout: float | None = None, correlation_id: str = ""
    ) -> AsyncIterator[Any]:
        """Partial results; closing the generator (or leaving the loop early) cancels the call."""
        decode = decoder_for(response_type_of(request)).decode
        replies: asyncio.Queue[Reply] = asyncio.Queue()
        target, body = target_of(type(request)), _encode(request)
        with self._open(target, body, timeout, correlation_id, True, replies.put_nowait) as call:
            while True:
                kind, _header, partial_body = await _next_reply(call, replies)
                if kind == wire.REPLY:
                    return
                yield decode(partial_body)

    async def stream_to(
        self,
        request: Request,
        each: Callable[[Any], None],
        timeout: float | None = None,
        correlation_id: str = "",
    ) -> None:
        """A streaming call whose partial results go to `each` as they are read, on the loop: no queue
        and no wake-up of this coroutine per result (a worker's leases: one fewer loop turn between a
        lease and its handler). Returns when the stream ends; raises as `stream` does, and with what
        `each` raised (the call is then cancelled)."""
        decode = decoder_for(response_type_of(request)).decode
        ended = asyncio.get_running_loop().create_future()

        def deliver(reply: Reply) -> None:
            if ended.done():
                return
            if reply[0] == wire.REPLY:
                ended.set_result(reply)
                return
            try:
                each(decode(reply[2]))
            except BaseException as exc:  # not into the connection's read: to the awaiting caller
                ended.set_exception(exc)

        target, body = target_of(type(request)), _encode(request)
        with self._open(target, body, timeout, correlation_id, True, deliver) as call:
            call.take(await _answer(call, ended))

    def _open(
        self,
        target: str,
        body: bytes,
        timeout: float | None,
        correlation_id: str,
        stream: bool,
        deliver: Callable[[Reply], None],
    ) -> PendingCall:
        timeout = self.timeout if timeout is None else timeout
        # 32 random hex digits, as uuid4().hex (less its version bits), for a sixth of its cost.
        correlation_id = correlation_id or os.urandom(16).hex()
        call = self.connection.core.new_call(
            target, body, timeout, correlation_id, stream, deliver, time.monotonic()
        )
        return PendingCall(self.connection, call)

    # -- events -------------------------------------------------------------------------------

    async def publish(self, event: Event, subtopic: str = "") -> None:
        topic = topic_for(event, subtopic)
        self.connection.send(wire.pack(wire.EVENT, topic.encode(), _encode(event)))

    async def subscribe(
        self, topics: list[str] | None = None, since: int | None = None, epoch: int | None = None
    ) -> AsyncIterator[Delivery]:
        """Matching events in order, with gaps and `since` filled from the broker's history
        (as BusClient.subscribe): from the events endpoint, or, with none (an agent), on the client's
        own connection: its own session's events only."""
        order = EventOrder(topics or [], since, epoch, filtered=not self.events_endpoint)
        # Subscribed before the replay: nothing slips between the two.
        if self.events_endpoint:
            sub = sub_socket(self.context, self.events_endpoint, self.curve)
            receive, close = sub.recv_multipart, lambda: sub.close(linger=0)
        else:
            delivered: asyncio.Queue[tuple[bytes, bytes]] = asyncio.Queue()
            subscription_id = self.connection.subscribe(
                topics or [], lambda *item: delivered.put_nowait(item)
            )
            receive, close = delivered.get, lambda: self.connection.unsubscribe(subscription_id)
        try:
            while True:
                while (replay := order.next_replay()) is not None:
                    order.take_replay(await self._replayed(replay))
                while order.backlog:
                    yield order.backlog.popleft()
                order.take_live(*await receive())
        finally:
            close()

    async def _replayed(self, request: BusEventsReplay) -> ReplayResult:
        """The replay, asked again while the replay budget refuses it (subscription.py ReplayRetry)."""
        retry = ReplayRetry(self.timeout)
        while True:
            try:
                return await self.call(request)
            except BusError as error:
                await asyncio.sleep(retry.wait(error, time.monotonic()))


async def _next_reply(call: PendingCall, replies: asyncio.Queue) -> Reply:
    try:
        async with asyncio.timeout(call.wait_time()):
            reply = await replies.get()
    except TimeoutError:
        raise call.expired() from None
    return call.take(reply)


async def _answer(call: PendingCall, answered: asyncio.Future) -> Reply:
    """A call's (last) reply, or its expiry: a future and a timer, not a queue and a timeout scope
    (most calls are these: their cost is every call's)."""
    expiry = asyncio.get_running_loop().call_later(call.wait_time(), _settle, answered, None)
    try:
        reply = await answered
    finally:
        expiry.cancel()
    if reply is None:
        raise call.expired()
    return reply


def _settle(answered: asyncio.Future, reply: Reply | None) -> None:
    if not answered.done():  # else a reply after the expiry, or to a caller that was cancelled
        answered.set_result(reply)
