"""Event subscriptions: live delivery plus replay, so nothing is lost.

On the host the SUB socket takes every topic and filters here: the broker's sequence
numbers are global, so only an unfiltered stream shows a real gap (events the
PUB dropped at its high-water mark). An agent has no event socket: the broker sends it
its own session's events on its connection (SUBSCRIBE), each stamped with the seq of
the previous one it matched (`prev`), so that filtered stream shows a gap too. A gap,
or a `since` at start, is filled from the broker's history with `bus.events.replay`
(filtered for an agent as its live events are); duplicates are skipped by sequence
number.
"""

from __future__ import annotations

import collections
import functools
import queue
import time
from typing import TYPE_CHECKING, Any

import msgspec
import zmq

from baaaht.bus import wire
from baaaht.bus.curve import ClientCurve
from baaaht.bus.errors import BusError
from baaaht.schemas.base import Event, all_subclasses
from baaaht.schemas.bus import BusEventsReplay, ReplayResult, StampedEvent
from baaaht.schemas.errors import ErrorCode

REPLAY_PAGE = 1000
# The longest a catch-up waits before asking again when its replay is refused for the agent's replay
# budget (limits.agent_replay_bytes_per_second; the broker says when in `retry_after`).
REPLAY_RETRY_MAX = 1.0
# "From now" is the broker's last seq when the subscription starts: the SUB socket connects
# asynchronously, so events published before it is connected would otherwise be lost.
NOW = BusEventsReplay(limit=0)

if TYPE_CHECKING:
    from baaaht.bus.client import BusClient


@functools.cache
def _event_decoder() -> msgspec.msgpack.Decoder:
    from baaaht import schemas

    schemas.load_all()
    concrete = tuple(cls for cls in all_subclasses(Event) if not cls.__subclasses__())
    return msgspec.msgpack.Decoder(functools.reduce(lambda a, b: a | b, concrete))


_UNDECODED = object()


class Delivery(msgspec.Struct, repr_omit_defaults=True):
    """One event as delivered: the stamp decoded, the body only when `event` is first read. A Struct, not
    a dataclass: one is made per event a subscriber takes, and a Struct is made in C (callgrind, a PUB
    batch taken: 8,730 -> 7,308 instructions per event)."""

    seq: int
    time: float
    topic: str
    source: str
    body: bytes
    _event: Any = _UNDECODED

    @property
    def event(self) -> Any:
        """The body decoded as its schema type, or None for an event type this process does not know."""
        if self._event is _UNDECODED:
            try:
                self._event = _event_decoder().decode(self.body)
            except msgspec.DecodeError:
                self._event = None
        return self._event

    def decode(self, event_type: type) -> Any:
        return msgspec.msgpack.decode(self.body, type=event_type)


class EventOrder:
    """Sequencing without I/O, shared by the blocking and asyncio subscriptions: which
    events to deliver, in order and once, and which history to replay first.

    A face feeds it PUB messages (`take_live`) and, while `next_replay()` returns a
    request, calls it and feeds the result back (`take_replay`); it yields `backlog`."""

    def __init__(
        self, topics: list[str], since: int | None = None, epoch: int | None = None, filtered: bool = False
    ):
        self.topics = topics
        self.filtered = filtered  # the broker sends only matching events: gaps are seen by `prev`
        self._prefixes = tuple(topics)  # str.startswith takes them all in one call
        self.last_seq = 0  # set by the first replay: the caller's `since`, or the broker's "now"
        self.epoch = epoch
        self.gaps = 0
        self.backlog: collections.deque[Delivery] = collections.deque()
        # (since, until) of the history still to fetch: at first, after `since`, or just "now".
        self._replay: tuple[int, int | None] | None = (since or 0, None)
        self._from_now = since is None
        self._held: list[Delivery] = []  # the live events that showed a gap: delivered after it

    def next_replay(self) -> BusEventsReplay | None:
        """The `bus.events.replay` request to make before anything more is delivered, if any."""
        if self._from_now:
            return NOW
        if self._replay is None:
            return None
        return BusEventsReplay(since=self._replay[0], topics=self.topics, limit=REPLAY_PAGE)

    def take_live(self, topic: bytes, envelope: bytes) -> None:
        """One PUB message (an event, the broker's batch of consecutive ones, or its heartbeat):
        deliver what it holds, or first replay the gap it shows."""
        stamp_bytes, body = wire.split(envelope)
        stamp = _decode_stamp(stamp_bytes)
        if stamp.epoch != self.epoch:
            if self.epoch is not None:
                self.last_seq = 0  # a restarted broker numbers from 1 again: replay all it has kept
            self.epoch = stamp.epoch
        kind = envelope[:_KIND]
        if kind == wire.HEARTBEAT:
            # The broker's last seq, published every interval: a loss is seen even when all is quiet.
            if stamp.seq > self.last_seq:
                self.gaps += 1
                self._replay = (self.last_seq, stamp.seq + 1)
            return
        if stamp.seq <= self.last_seq:
            return  # already delivered by a replay
        if kind == wire.EVENTS:
            events = [_delivery_of(event) for event in _decode_batch(body)]
            previous = stamp.prev
        else:
            events = [Delivery(stamp.seq, stamp.time, topic.decode(), stamp.source, body)]
            previous = stamp.prev if self.filtered else stamp.seq - 1
        if previous > self.last_seq:
            self.gaps += 1
            self._replay, self._held = (self.last_seq, events[0].seq), events
        else:
            self._accept(events)

    def _accept(self, deliveries: list[Delivery]) -> None:
        """Deliveries in seq order: those not delivered yet are, when their topic matches."""
        prefixes, backlog, last_seq = self._prefixes, self.backlog, self.last_seq
        for delivery in deliveries:
            if delivery.seq > last_seq:
                last_seq = delivery.seq
                if not prefixes or delivery.topic.startswith(prefixes):
                    backlog.append(delivery)
        self.last_seq = last_seq

    def take_replay(self, result: ReplayResult) -> None:
        """One page of history, for the request `next_replay` gave."""
        if self._from_now:
            self._from_now, self._replay = False, None
            self.last_seq, self.epoch = result.last_seq, result.epoch
            return
        since, until = self._replay
        self._replay = (self._take_page(result, until), until)
        if self._replay[0] is None:
            self._replay = None
            self._accept(self._held)
            self._held = []

    def _take_page(self, result: ReplayResult, until: int | None) -> int | None:
        """Queue one page; the `since` of the next page, or None when done."""
        if self.epoch is not None and result.epoch != self.epoch:
            self.epoch = result.epoch
            return 0  # a restarted broker: `since` counted another broker's events; take all it kept
        self.epoch = result.epoch
        for event in result.events:
            if until is not None and event.seq >= until:
                break
            self.backlog.append(_delivery_of(event))
        since = result.events[-1].seq if result.events else result.last_seq
        # A short page ends the history, unless the broker says it cut it (an agent's replay budget).
        ended = len(result.events) < REPLAY_PAGE and not result.more
        if ended or (until is not None and since >= until - 1):
            # What the broker no longer keeps is gone for good; carry on after it.
            self.last_seq = until - 1 if until is not None else max(since, result.last_seq)
            return None
        return since


class ReplayRetry:
    """When to ask again for a page of history the broker refused for the agent's replay budget: after
    the `retry_after` it gives (at most REPLAY_RETRY_MAX), for at most `timeout` seconds (the client's
    call timeout) from the first refusal: a big catch-up is slowed, not lost, and no wait is unbounded.
    Any other error, or one past that time, is raised."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self.give_up_at: float | None = None

    def wait(self, error: BusError, now: float) -> float:
        """The seconds to wait before asking again after `error`; raises it when there is no retrying."""
        retry_after = error.details.get("retry_after")
        if error.code is not ErrorCode.RESOURCE_EXHAUSTED or not isinstance(retry_after, (int, float)):
            raise error
        if self.give_up_at is None:
            self.give_up_at = now + self.timeout
        left = self.give_up_at - now
        if left <= 0:
            raise error
        return max(0.0, min(retry_after, REPLAY_RETRY_MAX, left))


def _delivery_of(event: StampedEvent) -> Delivery:
    return Delivery(event.seq, event.time, event.topic, event.source, bytes(event.body))


_decode_stamp = wire.event_stamp.decode
_decode_batch = wire.published_batch.decode
_KIND = len(wire.EVENT)
# The backend's recv with int flags: pyzmq's Python-level wrapper and its flag enums cost
# more per call than the receive itself.
_recv = zmq.backend.Socket.recv
NOBLOCK = int(zmq.NOBLOCK)
DRAIN = 256  # PUB messages taken per wake-up before handing events out


def sub_socket(context: zmq.Context, endpoint: str, curve: ClientCurve | None = None) -> zmq.Socket:
    sub = context.socket(zmq.SUB)
    if curve is not None:
        curve.apply(sub)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.RCVHWM, 100_000)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoint)
    return sub


class _SubSocket:
    """A host subscription's source: the broker's PUB, every topic."""

    def __init__(self, context: zmq.Context, endpoint: str, curve: ClientCurve | None = None):
        self.sub = sub_socket(context, endpoint, curve)

    def take(self) -> tuple[bytes, bytes] | None:
        """The next [topic, envelope], without waiting. Every PUB message is two frames, and a message
        arrives whole, so the second receive never waits."""
        try:
            topic = _recv(self.sub, NOBLOCK)
        except zmq.Again:
            return None
        return topic, _recv(self.sub, NOBLOCK)

    def wait(self, timeout: float) -> bool:
        return bool(self.sub.poll(timeout * 1000))

    def close(self) -> None:
        self.sub.close(linger=0)


class _ConnectionEvents:
    """An agent subscription's source: what the broker sends on the client's own connection."""

    def __init__(self, connection, topics: list[str]):
        self.connection = connection
        self.queue: queue.SimpleQueue[tuple[bytes, bytes]] = queue.SimpleQueue()
        self._waited: tuple[bytes, bytes] | None = None
        self.subscription_id = connection.subscribe(
            topics, lambda topic, envelope: self.queue.put((topic, envelope))
        )

    def take(self) -> tuple[bytes, bytes] | None:
        if self._waited is not None:
            item, self._waited = self._waited, None
            return item
        try:
            return self.queue.get_nowait()
        except queue.Empty:
            return None

    def wait(self, timeout: float) -> bool:
        if self._waited is None:
            try:
                self._waited = self.queue.get(timeout=timeout)
            except queue.Empty:
                return False
        return True

    def close(self) -> None:
        self.connection.unsubscribe(self.subscription_id)


class Subscription:
    """The blocking face of EventOrder: iterate, or `next(timeout)`. From the PUB socket at
    `endpoint`, or, with none (an agent), from the client's own connection."""

    def __init__(
        self, client: BusClient, endpoint: str, topics: list[str], since: int | None, epoch: int | None = None
    ):
        self.client = client
        self.order = EventOrder(topics, since, epoch, filtered=not endpoint)
        # Subscribed before the replay, so that nothing slips between the two.
        if endpoint:
            self._source = _SubSocket(client.connection.context, endpoint, client.curve)
        else:
            self._source = _ConnectionEvents(client.connection, topics)
        try:
            self._catch_up()
        except BaseException:
            self._source.close()
            raise

    @property
    def gaps(self) -> int:
        return self.order.gaps

    @property
    def last_seq(self) -> int:
        return self.order.last_seq

    @property
    def epoch(self) -> int | None:
        return self.order.epoch

    def __iter__(self):
        return self

    def __next__(self) -> Delivery:
        while True:
            delivery = self.next(timeout=1.0)
            if delivery is not None:
                return delivery

    def __enter__(self) -> "Subscription":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._source.close()

    def next(self, timeout: float) -> Delivery | None:
        """The next matching event, or None when none came within `timeout` seconds."""
        backlog = self.order.backlog
        if not backlog:
            self._drain()
        deadline = None
        while not backlog:
            deadline = deadline or time.monotonic() + timeout
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._source.wait(remaining):
                return None
            self._drain()
        return backlog.popleft()

    def _drain(self) -> None:
        """Take what the source holds (up to DRAIN messages) without waiting: one wait per batch,
        not per event."""
        source, order = self._source, self.order
        for _ in range(DRAIN):
            item = source.take()
            if item is None:
                return
            order.take_live(*item)
            if order.next_replay() is not None:
                self._catch_up()  # the gap is filled before any later live event is taken

    def _catch_up(self) -> None:
        while (request := self.order.next_replay()) is not None:
            self.order.take_replay(self._replayed(request))

    def _replayed(self, request: BusEventsReplay) -> ReplayResult:
        retry = ReplayRetry(self.client.timeout)
        while True:
            try:
                return self.client.call(request)
            except BusError as error:
                time.sleep(retry.wait(error, time.monotonic()))
