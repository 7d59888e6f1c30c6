"""Event subscriptions: live PUB delivery plus replay, so nothing is lost.

The SUB socket takes every topic and filters here: the broker's sequence
numbers are global, so only an unfiltered stream shows a real gap (events the
PUB dropped at its high-water mark). A gap, or a `since` at start, is filled
from the broker's history with `bus.events.replay`; duplicates are skipped by
sequence number.
"""

from __future__ import annotations

import collections
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec
import zmq

from baaaht.bus import wire
from baaaht.schemas.base import Event, all_subclasses
from baaaht.schemas.bus import EventsReplay

REPLAY_PAGE = 1000

if TYPE_CHECKING:
    from baaaht.bus.client import BusClient


@functools.cache
def _event_decoder() -> msgspec.msgpack.Decoder:
    from baaaht import schemas

    schemas.load_all()
    concrete = tuple(cls for cls in all_subclasses(Event) if not cls.__subclasses__())
    return msgspec.msgpack.Decoder(functools.reduce(lambda a, b: a | b, concrete))


@dataclass
class Delivery:
    seq: int
    time: float
    topic: str
    source: str
    body: bytes

    @functools.cached_property
    def event(self) -> Any:
        """The body decoded as its schema type, or None for an event type this process does not know."""
        try:
            return _event_decoder().decode(self.body)
        except msgspec.DecodeError:
            return None

    def decode(self, event_type: type) -> Any:
        return msgspec.msgpack.decode(self.body, type=event_type)


def matches(topics: list[str], topic: str) -> bool:
    return not topics or any(topic.startswith(t) for t in topics)


class Subscription:
    def __init__(self, client: BusClient, endpoint: str, topics: list[str], since: int | None):
        self.client = client
        self.topics = topics
        self.last_seq = since
        self.gaps = 0
        self._backlog: collections.deque[Delivery] = collections.deque()
        self._sub = client.connection.context.socket(zmq.SUB)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.RCVHWM, 100_000)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._sub.connect(endpoint)
        if since is not None:
            self._replay_after(since, until=None)

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
        self._sub.close(linger=0)

    def next(self, timeout: float) -> Delivery | None:
        """The next matching event, or None when none came within `timeout` seconds."""
        while not self._backlog:
            if not self._sub.poll(timeout * 1000):
                return None
            topic, envelope = self._sub.recv_multipart()
            stamp_bytes, body = wire.split(envelope)
            stamp = wire.event_stamp.decode(stamp_bytes)
            if self.last_seq is not None and stamp.seq <= self.last_seq:
                continue  # already delivered by a replay
            if self.last_seq is not None and stamp.seq > self.last_seq + 1:
                self.gaps += 1
                self._replay_after(self.last_seq, until=stamp.seq)
            self.last_seq = stamp.seq
            if matches(self.topics, topic.decode()):
                self._backlog.append(Delivery(stamp.seq, stamp.time, topic.decode(), stamp.source, body))
        return self._backlog.popleft()

    def _replay_after(self, since: int, until: int | None) -> None:
        """Queue the kept events after `since` (and before `until`) from the broker's history."""
        while True:
            result = self.client.call(EventsReplay(since=since, topics=self.topics, limit=REPLAY_PAGE))
            for event in result.events:
                if until is not None and event.seq >= until:
                    break
                self._backlog.append(
                    Delivery(event.seq, event.time, event.topic, event.source, bytes(event.body))
                )
            since = result.events[-1].seq if result.events else result.last_seq
            if len(result.events) < REPLAY_PAGE or (until is not None and since >= until - 1):
                # What the broker no longer keeps is gone for good; carry on after it.
                self.last_seq = until - 1 if until is not None else max(since, result.last_seq)
                return
