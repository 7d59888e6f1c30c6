"""The client's protocol state machine (bus/protocol.py) without sockets: time is `now`."""

from __future__ import annotations

import msgspec

from baaaht.bus import wire
from baaaht.bus.errors import BusError
from baaaht.bus.protocol import DEADLINE_GRACE, ClientCore, is_broker_unreachable
from baaaht.bus.subscription import NOW, REPLAY_PAGE, EventOrder
from baaaht.schemas.bus import BusEventsReplay, ReplayResult, StampedEvent
from baaaht.schemas.errors import ErrorBody, ErrorCode

WALL = 1_700_000_000.0


def core(**kwargs) -> ClientCore:
    return ClientCore(
        "ipc:///run/test.sock", heartbeat_interval=1.0, liveness=3, wall_clock=lambda: WALL, **kwargs
    )


def open_call(client: ClientCore, now: float = 0.0, timeout: float = 5.0, stream: bool = False):
    replies: list = []
    call = client.new_call("echo.say", b"\x80", timeout, "corr", stream, replies.append, now)
    return call, replies, client.start(call)


def reply(request_id: str, kind: bytes = wire.REPLY, body: bytes = b"\x80", error: str = "") -> list[bytes]:
    return [wire.reply(kind, request_id, body, error)]


def error_in(delivered) -> BusError:
    kind, header, body = delivered
    assert kind == wire.REPLY
    return BusError.from_body(wire.error_body.decode(body))


def test_a_call_carries_an_absolute_wire_deadline_and_expires_on_the_monotonic_clock():
    client = core()
    call, _, envelope = open_call(client, now=100.0, timeout=5.0)
    header = wire.request_header.decode(wire.header_of(envelope))
    assert (header.id, header.target, header.deadline, header.correlation) == (
        call.id,
        "echo.say",
        WALL + 5.0,
        "corr",
    )
    assert call.expires == 105.0 + DEADLINE_GRACE


def test_replies_reach_their_call_and_the_final_one_closes_it():
    client = core()
    client.on_connected(0.0)
    call, replies, _ = open_call(client, stream=True)
    client.receive(reply(call.id, wire.PARTIAL), 0.1)
    client.receive(reply(call.id), 0.2)
    client.receive(reply(call.id), 0.3)  # nobody waits for it any more
    assert [kind for kind, _, _ in replies] == [wire.PARTIAL, wire.REPLY]
    assert client.abandon(call) is None  # finished: nothing to cancel


def test_a_call_given_up_while_connected_is_a_timeout_not_an_unreachable_broker():
    client = core()
    client.on_connected(0.0)
    call, _, _ = open_call(client)
    error = client.give_up(call)
    assert error.code == ErrorCode.TIMEOUT and not is_broker_unreachable(error)
    assert "from the broker" not in error.message  # what baaaht-ctl used to turn into "is the host running?"
    assert client.abandon(call) == wire.pack(wire.CANCEL, body=call.id.encode())


def test_a_call_given_up_while_the_broker_is_away_is_unavailable():
    client = core()
    call, _, _ = open_call(client)
    error = client.give_up(call)
    assert error.code == ErrorCode.UNAVAILABLE and is_broker_unreachable(error)
    assert client.abandon(call) is None  # no CANCEL queued for a broker that is not there


def test_a_disconnect_answers_every_call_in_flight_unavailable_at_once():
    client = core()
    client.on_connected(0.0)
    calls = [open_call(client) for _ in range(3)]
    client.on_disconnected(0.5)
    for _call, replies, _ in calls:
        assert len(replies) == 1 and is_broker_unreachable(error_in(replies[0]))
    assert not client.connected


def test_a_service_registers_on_every_connect_and_when_the_broker_forgot_it():
    client = core(registration=lambda: b"reg")
    register = wire.pack(wire.REGISTER, body=b"reg")
    assert client.on_connected(0.0) == (register,)
    client.on_disconnected(1.0)
    assert client.on_connected(1.2) == (register,)
    forgotten = ErrorBody(code=ErrorCode.UNAVAILABLE, message="unknown service instance: register again")
    assert client.receive([wire.pack(wire.DISCONNECT, body=wire.encode(forgotten))], 2.0) == (register,)
    refused = ErrorBody(code=ErrorCode.PERMISSION_DENIED, message="no")
    assert client.receive([wire.pack(wire.DISCONNECT, body=wire.encode(refused))], 3.0) == ()
    assert client.refused == refused


def test_a_plain_client_does_not_register():
    assert core().on_connected(0.0) == ()


def test_heartbeats_flow_only_while_connected():
    client = core(health=lambda: b"health")
    assert client.tick(0.0) == ((), False)
    client.on_connected(0.0)
    beat = wire.pack(wire.HEARTBEAT, body=b"health")
    assert client.tick(0.0) == ((beat,), False)
    assert client.tick(0.5) == ((), False)
    assert client.next_timer(0.5) == 0.5
    client.receive([wire.pack(wire.HEARTBEAT)], 0.9)
    assert client.tick(1.0) == ((beat,), False)


def test_a_connected_broker_silent_for_liveness_intervals_fails_calls_and_asks_for_a_new_socket():
    client = core()
    client.on_connected(0.0)
    call, replies, _ = open_call(client)
    client.receive([wire.pack(wire.HEARTBEAT)], 1.0)
    assert client.tick(3.9)[1] is False
    assert client.tick(4.1) == ((), True)
    assert is_broker_unreachable(error_in(replies[0])) and not client.connected
    assert client.tick(10.0) == ((), False)  # nothing more until the new socket connects


def test_close_cancels_open_calls_and_disconnects_from_a_connected_broker():
    client = core()
    client.on_connected(0.0)
    call, replies, _ = open_call(client)
    assert client.close() == (wire.pack(wire.DISCONNECT),)
    assert error_in(replies[0]).code == ErrorCode.CANCELLED
    assert core().close() == ()  # never connected: nobody to tell


def test_a_broker_error_reply_passes_through_with_its_code():
    client = core()
    client.on_connected(0.0)
    call, replies, _ = open_call(client)
    body = msgspec.msgpack.encode(ErrorBody(code=ErrorCode.TIMEOUT, message="deadline passed"))
    client.receive(reply(call.id, body=body, error="TIMEOUT"), 0.5)
    kind, header, body = replies[0]
    assert header.error == "TIMEOUT" and error_in(replies[0]).message == "deadline passed"


# -- the subscriptions' ordering core (bus/subscription.py) -----------------------------------------


def live(seq: int, topic: str = "echo.shouted", epoch: int = 7) -> tuple[bytes, bytes]:
    stamp = wire.encode(wire.EventStamp(seq, 1.0, "echo", epoch))
    return topic.encode(), wire.pack(wire.EVENT, stamp, b"\x80")


def replayed(*seqs: int, last_seq: int, epoch: int = 7) -> ReplayResult:
    events = [StampedEvent(seq=s, time=1.0, topic="echo.shouted", source="echo", body=b"\x80") for s in seqs]
    return ReplayResult(events=events, first_seq=1, last_seq=last_seq, epoch=epoch)


def test_from_now_asks_for_the_brokers_last_seq_first():
    order = EventOrder(["echo."])
    assert order.next_replay() == NOW
    order.take_replay(replayed(last_seq=4))
    assert order.next_replay() is None and order.last_seq == 4
    order.take_live(*live(5))
    assert [d.seq for d in order.backlog] == [5]


def test_a_gap_is_replayed_before_the_live_event_that_showed_it():
    order = EventOrder(["echo."], since=1, epoch=7)
    order.take_replay(replayed(last_seq=1))
    order.take_live(*live(4))
    assert order.next_replay() == BusEventsReplay(since=1, topics=["echo."], limit=REPLAY_PAGE)
    assert not order.backlog  # 4 waits for 2 and 3
    order.take_replay(replayed(2, 3, last_seq=4))
    assert [d.seq for d in order.backlog] == [2, 3, 4] and order.gaps == 1
    order.take_live(*live(3))  # late duplicate
    assert len(order.backlog) == 3


def published_batch(*seqs: int, topics=("echo.shouted",), epoch: int = 7) -> tuple[bytes, bytes]:
    """The broker's PUB batch: the stamp says the last seq and the one before the first."""
    events = [
        StampedEvent(seq=s, time=1.0, topic=topics[i % len(topics)], source="echo", body=msgspec.Raw(b"\x80"))
        for i, s in enumerate(seqs)
    ]
    stamp = wire.encode(wire.EventStamp(seqs[-1], 1.0, "bus", epoch, seqs[0] - 1))
    return b"", wire.pack(wire.EVENTS, stamp, wire.encode(events))


def test_a_published_batch_is_delivered_in_order_and_filtered_by_topic():
    order = EventOrder(["echo."], since=0, epoch=7)
    order.take_replay(replayed(last_seq=0))
    order.take_live(*published_batch(1, 2, 3, 4, topics=("echo.shouted", "other.thing")))
    assert [(d.seq, d.topic, d.body) for d in order.backlog] == [
        (1, "echo.shouted", b"\x80"),
        (3, "echo.shouted", b"\x80"),
    ]
    assert order.last_seq == 4 and order.gaps == 0 and order.next_replay() is None


def test_a_lost_batch_is_replayed_before_the_batch_that_showed_it():
    order = EventOrder(["echo."], since=0, epoch=7)
    order.take_replay(replayed(last_seq=0))
    order.take_live(*published_batch(1, 2))
    order.take_live(*published_batch(5, 6))  # 3 and 4 were dropped at the high-water mark
    assert order.gaps == 1
    assert order.next_replay() == BusEventsReplay(since=2, topics=["echo."], limit=REPLAY_PAGE)
    order.take_replay(replayed(3, 4, last_seq=6))
    assert [d.seq for d in order.backlog] == [1, 2, 3, 4, 5, 6]


def test_events_of_a_batch_already_replayed_are_delivered_once():
    order = EventOrder(["echo."], since=1, epoch=7)
    order.take_replay(replayed(2, 3, last_seq=3))
    order.take_live(*published_batch(2, 3, 4, 5))  # the subscription started while these were published
    assert [d.seq for d in order.backlog] == [2, 3, 4, 5] and order.gaps == 0
    order.take_live(*published_batch(4, 5))
    assert len(order.backlog) == 4


def test_a_restarted_broker_is_replayed_from_its_start():
    order = EventOrder([], since=50, epoch=7)
    order.take_replay(replayed(last_seq=50))
    order.take_live(*live(2, epoch=8))
    assert order.next_replay().since == 0
    order.take_replay(replayed(1, last_seq=2, epoch=8))
    assert [d.seq for d in order.backlog] == [1, 2]
