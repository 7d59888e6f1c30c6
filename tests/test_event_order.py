"""EventOrder, the sequencing both subscription faces share, on a filtered stream (an agent's): a gap is
seen by the `prev` each delivery carries, not by the global numbering; pages the broker cut for an
agent's replay budget (`more`), and when a page it refused is asked again (ReplayRetry)."""

from __future__ import annotations

import msgspec
import pytest

from baaaht.bus import wire
from baaaht.bus.errors import BusError
from baaaht.bus.subscription import REPLAY_RETRY_MAX, EventOrder, ReplayRetry
from baaaht.schemas.bus import BusEventsReplay, ReplayResult, StampedEvent
from baaaht.schemas.errors import ErrorCode

EPOCH = 7


def live(seq: int, prev: int, topic: str = "session.closed/s1") -> tuple[bytes, bytes]:
    stamp = wire.encode(wire.EventStamp(seq, 1.0, "session", EPOCH, prev))
    return topic.encode(), wire.pack(wire.EVENT, stamp, msgspec.msgpack.encode({"n": seq}))


def heartbeat(last_matched: int) -> tuple[bytes, bytes]:
    return b"", wire.pack(wire.HEARTBEAT, wire.encode(wire.EventStamp(last_matched, 1.0, "bus", EPOCH)))


def started(filtered: bool = True) -> EventOrder:
    order = EventOrder(["session."], filtered=filtered)
    assert order.next_replay() == BusEventsReplay(limit=0)
    order.take_replay(ReplayResult(events=[], first_seq=1, last_seq=10, epoch=EPOCH))
    return order


def kept(*seqs: int) -> ReplayResult:
    events = [
        StampedEvent(seq=s, time=1.0, topic="session.closed/s1", source="session", body=msgspec.Raw(b"\x80"))
        for s in seqs
    ]
    return ReplayResult(events=events, first_seq=1, last_seq=max(seqs, default=0), epoch=EPOCH)


def test_sparse_seqs_chained_by_prev_are_no_gap():
    order = started()
    for seq, prev in ((14, 10), (20, 14), (21, 20)):
        order.take_live(*live(seq, prev))
    assert [d.seq for d in order.backlog] == [14, 20, 21]
    assert order.gaps == 0 and order.next_replay() is None


def test_a_lost_delivery_is_replayed_before_the_one_that_showed_it():
    order = started()
    order.take_live(*live(14, 10))
    order.take_live(*live(30, 20))  # 20 matched too, and never came
    assert order.gaps == 1
    assert order.next_replay() == BusEventsReplay(since=14, topics=["session."], limit=1000)
    order.take_replay(kept(20))
    assert order.next_replay() is None
    assert [d.seq for d in order.backlog] == [14, 20, 30]


def test_a_quiet_stream_shows_a_loss_by_the_stamped_heartbeat():
    order = started()
    order.take_live(*heartbeat(10))
    assert order.next_replay() is None
    order.take_live(*heartbeat(12))  # 12 matched and never came
    assert order.gaps == 1 and order.next_replay().since == 10


def test_the_same_stream_read_as_unfiltered_would_see_gaps_everywhere():
    """Why the flag: on PUB every seq is sent, so a jump is a loss."""
    order = started(filtered=False)
    order.take_live(*live(14, 10))
    assert order.gaps == 1


def test_a_short_page_the_broker_cut_is_followed_by_the_next_one():
    """An agent's replay budget cuts pages short; only `more` tells such a page from the history's end."""
    order = EventOrder(["session."], since=10, epoch=EPOCH, filtered=True)
    assert order.next_replay() == BusEventsReplay(since=10, topics=["session."], limit=1000)
    order.take_replay(msgspec.structs.replace(kept(11, 12), more=True))
    assert order.next_replay() == BusEventsReplay(since=12, topics=["session."], limit=1000)
    order.take_replay(kept(13))
    assert order.next_replay() is None
    assert [d.seq for d in order.backlog] == [11, 12, 13] and order.last_seq == 13


def test_a_gap_filled_in_pages_the_broker_cut_delivers_the_held_event_after_them():
    order = started()
    order.take_live(*live(30, 20))  # 15 and 20 matched too, and never came
    order.take_replay(msgspec.structs.replace(kept(15), more=True))
    assert order.next_replay().since == 15
    order.take_replay(kept(20))
    assert order.next_replay() is None
    assert [d.seq for d in order.backlog] == [15, 20, 30]


def exhausted(retry_after: float) -> BusError:
    return BusError(ErrorCode.RESOURCE_EXHAUSTED, "replay budget", {"retry_after": retry_after})


def test_a_refused_page_is_asked_again_after_the_brokers_retry_after_capped_and_within_the_timeout():
    retry = ReplayRetry(timeout=2.5)
    assert retry.wait(exhausted(0.25), now=100.0) == 0.25
    assert retry.wait(exhausted(30.0), now=100.0) == REPLAY_RETRY_MAX
    assert retry.wait(exhausted(30.0), now=102.0) == pytest.approx(0.5)  # what is left of the timeout
    with pytest.raises(BusError) as caught:
        retry.wait(exhausted(0.1), now=102.5)
    assert caught.value.details == {"retry_after": 0.1}


@pytest.mark.parametrize(
    "error",
    [
        BusError(ErrorCode.RESOURCE_EXHAUSTED, "in flight", {"limit": 128, "in_flight": 128}),
        BusError(ErrorCode.PERMISSION_DENIED, "not yours", {"retry_after": 0.1}),
    ],
)
def test_other_errors_of_a_replay_are_raised_at_once(error):
    with pytest.raises(BusError) as caught:
        ReplayRetry(timeout=10.0).wait(error, now=0.0)
    assert caught.value is error
