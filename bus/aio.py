"""The asyncio bus client: the blocking client's contract on an event loop.

    async with AsyncBusClient.for_config(config) as bus:
        session = await bus.call(SessionGet(id=sid))
        async for chunk in bus.stream(ContainerLogs(id=cid, follow=True)):
            ...
        async for delivery in bus.subscribe(["session.message."]):
            ...

One task owns the DEALER: it reads replies, sends heartbeats and rebuilds the
socket when the broker falls silent, as the blocking client's I/O thread does.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from typing import Any, AsyncIterator

import msgspec
import zmq
import zmq.asyncio

from baaaht.bus import wire
from baaaht.bus.client import client_settings, decoder_for, response_type_of
from baaaht.bus.errors import BusError
from baaaht.bus.subscription import NOW, Delivery, EventOrder, sub_socket
from baaaht.schemas.base import Event, Request, target_of, topic_of
from baaaht.schemas.config import Config
from baaaht.schemas.errors import ErrorBody, ErrorCode

log = logging.getLogger("baaaht.bus")
_encode = msgspec.msgpack.Encoder().encode


class AsyncBusClient:
    def __init__(
        self,
        endpoint: str,
        *,
        events_endpoint: str = "",
        timeout: float = 10.0,
        heartbeat_interval: float = 1.0,
        liveness: int = 3,
    ):
        self.endpoint = endpoint
        self.events_endpoint = events_endpoint
        self.timeout = timeout
        self.heartbeat_interval = heartbeat_interval
        self.liveness = liveness
        self.context = zmq.asyncio.Context.instance()
        self._pending: dict[str, asyncio.Queue] = {}
        self._ids = itertools.count(1)
        self._dealer = self._new_dealer()
        self._task: asyncio.Task | None = None

    @classmethod
    def for_config(cls, config: Config, *, timeout: float | None = None) -> "AsyncBusClient":
        return cls(**client_settings(config, timeout))

    async def __aenter__(self) -> "AsyncBusClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self._dealer.close(linger=0)
        self._fail_pending(ErrorCode.CANCELLED, "the connection was closed")

    # -- calls --------------------------------------------------------------------------------

    async def call(self, request: Request, timeout: float | None = None, correlation_id: str = "") -> Any:
        body = await self.call_raw(target_of(type(request)), _encode(request), timeout, correlation_id)
        return decoder_for(response_type_of(request)).decode(body)

    async def call_raw(
        self, target: str, body: bytes, timeout: float | None = None, correlation_id: str = ""
    ) -> bytes:
        request_id, deadline = await self._send_request(target, body, timeout, correlation_id, stream=False)
        try:
            _kind, _header, result = await self._next_reply(request_id, target, deadline)
            return result
        finally:
            self._pending.pop(request_id, None)

    async def stream(
        self, request: Request, timeout: float | None = None, correlation_id: str = ""
    ) -> AsyncIterator[Any]:
        """Partial results; closing the generator (or leaving the loop early) cancels the call."""
        decode = decoder_for(response_type_of(request)).decode
        target = target_of(type(request))
        request_id, deadline = await self._send_request(
            target, _encode(request), timeout, correlation_id, True
        )
        finished = False
        try:
            while True:
                kind, _header, body = await self._next_reply(request_id, target, deadline)
                if kind == wire.REPLY:
                    finished = True
                    return
                yield decode(body)
        except BusError:
            finished = True
            raise
        finally:
            self._pending.pop(request_id, None)
            if not finished:
                await self._dealer.send(wire.pack(wire.CANCEL, body=request_id.encode()))

    async def _send_request(self, target: str, body: bytes, timeout, correlation_id: str, stream: bool):
        self._ensure_running()
        request_id = format(next(self._ids), "x")
        deadline = time.time() + (self.timeout if timeout is None else timeout)
        self._pending[request_id] = asyncio.Queue()
        correlation = correlation_id or uuid.uuid4().hex
        await self._dealer.send(wire.request(request_id, target, deadline, correlation, stream, body))
        return request_id, deadline

    async def _next_reply(self, request_id: str, target: str, deadline: float):
        replies = self._pending[request_id]
        try:
            # A little grace past the deadline lets the broker's own TIMEOUT reply arrive first.
            kind, header, body = await asyncio.wait_for(replies.get(), max(0.0, deadline - time.time() + 0.5))
        except asyncio.TimeoutError:
            raise BusError(
                ErrorCode.TIMEOUT, f"no answer to {target} from the broker at {self.endpoint}"
            ) from None
        wire.raise_for_error(header, body)
        return kind, header, body

    # -- events -------------------------------------------------------------------------------

    async def publish(self, event: Event, subtopic: str = "") -> None:
        self._ensure_running()
        topic = topic_of(type(event)) + (f".{subtopic}" if subtopic else "")
        await self._dealer.send(wire.pack(wire.EVENT, topic.encode(), _encode(event)))

    async def subscribe(
        self, topics: list[str] | None = None, since: int | None = None
    ) -> AsyncIterator[Delivery]:
        """Matching events in order, with gaps and `since` filled from the broker's history."""
        if not self.events_endpoint:
            raise BusError(ErrorCode.FAILED_PRECONDITION, "this client has no events endpoint")
        order = EventOrder(topics or [])
        sub = sub_socket(self.context, self.events_endpoint)
        try:
            await self._fill(order, (await self.call(NOW)).last_seq if since is None else since, None)
            while True:
                while order.backlog:
                    yield order.backlog.popleft()
                gap, delivery = order.take_live(*await sub.recv_multipart())
                if gap is not None:
                    await self._fill(order, *gap)
                if delivery is not None:
                    order.accept(delivery)
        finally:
            sub.close(linger=0)

    async def _fill(self, order: EventOrder, since: int | None, until: int | None) -> None:
        while since is not None:
            since = order.take_replay(await self.call(order.replay_request(since)), until)

    # -- the connection task ------------------------------------------------------------------

    def _new_dealer(self) -> zmq.asyncio.Socket:
        dealer = self.context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.RECONNECT_IVL, 100)
        dealer.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        dealer.connect(self.endpoint)
        return dealer

    def _ensure_running(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="baaaht-bus-io")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        heard_at, broker_seen, next_beat = loop.time(), False, 0.0
        while True:
            timeout = max(0.0, min(next_beat - loop.time(), self.heartbeat_interval))
            if await self._dealer.poll(timeout * 1000):
                heard_at, broker_seen = loop.time(), True
                self._dispatch(await self._dealer.recv())
            now = loop.time()
            if now >= next_beat:
                await self._dealer.send(wire.pack(wire.HEARTBEAT))
                next_beat = now + self.heartbeat_interval
            if broker_seen and now - heard_at > self.heartbeat_interval * self.liveness:
                log.warning("broker silent: reconnecting", extra={"endpoint": self.endpoint})
                self._fail_pending(ErrorCode.UNAVAILABLE, f"lost the broker at {self.endpoint}")
                self._dealer.close(linger=0)
                self._dealer, broker_seen = self._new_dealer(), False

    def _dispatch(self, envelope: bytes) -> None:
        kind = wire.kind_of(envelope)
        if kind not in (wire.REPLY, wire.PARTIAL):
            return  # heartbeats; a client gets nothing else
        header_bytes, body = wire.split(envelope)
        header = wire.reply_header.decode(header_bytes)
        replies = self._pending.get(header.id)
        if replies is not None:
            replies.put_nowait((kind, header, body))

    def _fail_pending(self, code: ErrorCode, message: str) -> None:
        body = wire.encode(ErrorBody(code=code, message=message))
        for request_id, replies in self._pending.items():
            replies.put_nowait((wire.REPLY, wire.ReplyHeader(request_id, code.value), body))
