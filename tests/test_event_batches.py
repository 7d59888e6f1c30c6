"""EVENTS: several events in one message from a publisher, each judged as if sent alone."""

from __future__ import annotations

import msgspec
import pytest
import zmq

from baaaht.bus import wire
from baaaht.bus.driver import EventBatch
from baaaht.bus.subscription import sub_socket
from baaaht.bus.testing import wait_for
from baaaht.schemas.bus import BusEventsReplay, BusStats
from tests.test_bus import next_reply, raw_dealer


def event(topic: str, body: bytes) -> bytes:
    return wire.pack(wire.EVENT, topic.encode(), body)


def test_a_batch_is_unpacked_in_order():
    envelopes = [event("a.one", b"\x01"), event("b.two", b"\xa1x")]
    assert wire.events_in(wire.split(wire.batch_of_events(envelopes))[1]) == [
        (b"a.one", b"\x01"),
        (b"b.two", b"\xa1x"),
    ]


@pytest.mark.parametrize(
    "body",
    [
        (100).to_bytes(4, "big") + event("a.one", b"\x01"),  # a length past the end
        (7).to_bytes(4, "big") + wire.pack(wire.REQUEST),  # not an EVENT
        b"\x00\x00",  # a length cut short
        wire.batch_of_events([event("a.one", b"\x01")] * 4000)[wire.PREFIX :],  # over the batch size
    ],
)
def test_a_batch_that_is_not_whole_events_is_refused_whole(body):
    whole = event("a.zero", b"\x00")
    with pytest.raises(wire.MalformedFrame):
        wire.events_in(len(whole).to_bytes(4, "big") + whole + body)


def test_the_outbox_batches_only_events_and_only_up_to_the_batch_size():
    batch = EventBatch()
    assert batch.take() is None
    assert not batch.add(wire.pack(wire.HEARTBEAT))
    one = event("a.one", b"\x01")
    assert batch.add(one) and batch.take() == one  # a lone event goes out as it is
    assert not batch.add(event("a.big", b"\xc4" + b"x" * wire.EVENTS_BATCH_BYTES))
    while batch.add(one):
        pass
    taken = batch.take()
    assert len(taken) <= wire.EVENTS_BATCH_BYTES + wire.PREFIX
    events = wire.events_in(wire.split(taken)[1])
    assert len(events) > 1 and set(events) == {(b"a.one", b"\x01")}


@pytest.fixture
def agent(echo):
    echo.identify("s1")
    dealer = raw_dealer(echo, "agents")
    yield dealer
    dealer.close(0)


def test_each_event_of_a_batch_is_authorized_checked_and_stamped_in_order(echo, agent):
    client = echo.client()
    before = client.call(BusEventsReplay(limit=0)).last_seq
    good = [msgspec.msgpack.encode({"n": n}) for n in range(2)]
    agent.send(
        wire.batch_of_events(
            [
                event("agent.progress", good[0]),
                event("agent.progress", b"\xc1 not msgpack"),
                event("session.created", good[0]),  # outside the topics an agent may publish
                event("agent.progress", good[1]),
            ]
        )
    )
    refusals = [next_reply(agent, "")[0].error for _ in range(2)]
    assert sorted(refusals) == ["INVALID_ARGUMENT", "PERMISSION_DENIED"]
    wait_for(lambda: client.call(BusEventsReplay(limit=0)).last_seq == before + 2)
    replayed = client.call(BusEventsReplay(since=before)).events
    assert [(e.seq, e.topic, bytes(e.body)) for e in replayed] == [
        (before + 1, "agent.progress/s1", good[0]),
        (before + 2, "agent.progress/s1", good[1]),
    ]


def test_a_malformed_batch_publishes_nothing(echo, agent):
    client = echo.client()
    before = client.call(BusEventsReplay(limit=0)).last_seq
    whole = event("agent.progress", b"\x01")
    agent.send(wire.pack(wire.EVENTS, body=len(whole).to_bytes(4, "big") + whole + b"\x00\x00\x00\x09"))
    assert next_reply(agent, "")[0].error == "INVALID_ARGUMENT"
    assert client.call(BusStats()).malformed_kinds.get("undecodable_events") == 1
    assert client.call(BusEventsReplay(limit=0)).last_seq == before


def test_a_burst_goes_out_on_pub_in_batches_and_each_event_arrives_once_in_order(host):
    publisher = host.service_client("kit")  # a registered service publishes its own topics
    sub = sub_socket(zmq.Context.instance(), host.endpoints.events)
    try:
        assert sub.poll(5000), "no heartbeat on PUB"  # connected: what is published from now on comes
        with host.client().subscribe(["kit."]) as events:
            bodies = [msgspec.msgpack.encode({"n": n}) for n in range(2000)]
            for body in bodies:
                publisher.connection.send(event("kit.tick", body))
            delivered = [events.next(timeout=5) for _ in bodies]
        assert [d.body for d in delivered if d is not None] == bodies
        seqs, batches = [], 0
        while len([s for s, topic in seqs if topic == "kit.tick"]) < len(bodies):
            assert sub.poll(5000), "PUB sent fewer events than were published"
            topic, envelope = sub.recv_multipart()
            kind, (header, body) = wire.kind_of(envelope), wire.split(envelope)
            if kind == wire.EVENTS:
                batches += 1
                stamp = wire.event_stamp.decode(header)
                batch = wire.published_batch.decode(body)
                assert [e.seq for e in batch] == list(range(stamp.prev + 1, stamp.seq + 1))
                seqs += [(e.seq, e.topic) for e in batch]
            elif kind == wire.EVENT:
                seqs.append((wire.event_stamp.decode(header).seq, topic.decode()))
    finally:
        sub.close(0)
    assert batches >= 1  # the broker sent what one round of its loop stamped together
    assert [s for s, _ in seqs] == list(range(seqs[0][0], seqs[0][0] + len(seqs)))  # none lost, in order


@pytest.mark.parametrize("batched", [False, True], ids=["alone", "first of a batch"])
def test_an_event_with_an_empty_topic_is_judged_as_any_other(echo, agent, batched):
    """An empty topic was taken for the one judged before (none) and published on topic "", outside the
    agent's session and its role's rules, to every host subscriber of all topics."""
    client = echo.client()
    before = client.call(BusEventsReplay(limit=0)).last_seq
    body = msgspec.msgpack.encode({"n": 1})
    sent = [event("", body), event("agent.progress", body)]
    agent.send(wire.batch_of_events(sent) if batched else sent[0])
    assert next_reply(agent, "")[0].error == "PERMISSION_DENIED"
    if batched:
        wait_for(lambda: client.call(BusEventsReplay(limit=0)).last_seq == before + 1)
    replayed = client.call(BusEventsReplay(since=before)).events
    assert [e.topic for e in replayed] == (["agent.progress/s1"] if batched else [])
