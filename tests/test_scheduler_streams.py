"""The scheduler's stream slots (services/scheduler/streams.py): a few hostile sessions at their cap must
not take every stream; every other session's worker still gets a task.work and its assistant a task.wait,
and host callers always get both."""

from __future__ import annotations

import contextlib

import pytest

from baaaht.bus.errors import BusError
from baaaht.schemas.errors import ErrorCode
from baaaht.services.scheduler.service import MAX_STREAMS, SESSION_STREAMS, WAIT_STREAMS, WORK_STREAMS
from baaaht.services.scheduler.streams import HOST, StreamSlots

KINDS = ["work", "wait"]


def service_slots() -> StreamSlots:
    return StreamSlots(MAX_STREAMS, SESSION_STREAMS, {"work": WORK_STREAMS, "wait": WAIT_STREAMS})


def fill(slots: StreamSlots, held: contextlib.ExitStack, scope, kind: str) -> int:
    """Open streams of `kind` for `scope` until refused; how many it got."""
    got = 0
    while True:
        try:
            held.enter_context(slots.hold("test", scope, kind))
        except BusError as error:
            assert error.code is ErrorCode.RESOURCE_EXHAUSTED
            return got
        got += 1


@pytest.mark.parametrize("hostile_kind", KINDS, ids=["task.work storm", "task.wait storm"])
def test_hostile_sessions_at_their_cap_leave_every_other_session_a_work_and_a_wait_stream(hostile_kind):
    slots = service_slots()
    with contextlib.ExitStack() as held:
        hostile = [fill(slots, held, f"sess-hostile-{n}", hostile_kind) for n in range(6)]
        assert all(n <= SESSION_STREAMS for n in hostile)
        assert sum(hostile) < MAX_STREAMS
        for n in range(16):  # other sessions: a worker's task.work and an assistant's task.wait each
            held.enter_context(slots.hold("take work", f"sess-{n}", "work"))
            held.enter_context(slots.hold("wait for tasks", f"sess-{n}", "wait"))
        held.enter_context(slots.hold("take work", HOST, "work"))
        held.enter_context(slots.hold("wait for tasks", HOST, "wait"))
        assert slots.open <= MAX_STREAMS


def test_each_reserve_gives_a_session_one_stream_of_its_kind_and_host_callers_as_many_as_it_has():
    slots = StreamSlots(total=12, per_session=10, reserves={"work": 4, "wait": 2})
    with contextlib.ExitStack() as held:
        assert fill(slots, held, "sess-a", "wait") == 7  # the shared part, then one of the wait reserve
        assert fill(slots, held, "sess-a", "work") == 1
        assert fill(slots, held, "sess-b", "wait") == 1
        assert fill(slots, held, "sess-b", "work") == 1
        assert fill(slots, held, HOST, "work") == 2
        assert fill(slots, held, HOST, "wait") == 0  # sess-a and sess-b hold the wait reserve
        assert fill(slots, held, "sess-c", "work") == 0
        assert slots.open == 12
    assert slots.open == 0
    with slots.hold("take work", "sess-c", "work"), slots.hold("wait for tasks", "sess-c", "wait"):
        assert slots.open == 2  # all given back


def test_a_sessions_cap_counts_its_streams_in_the_reserves_too():
    slots = StreamSlots(total=10, per_session=3, reserves={"work": 2, "wait": 2})
    with contextlib.ExitStack() as held:
        assert fill(slots, held, "sess-x", "wait") == 3
        assert fill(slots, held, "sess-y", "wait") == 3  # 6 shared: sess-y's third is from the reserve
        for kind in KINDS:
            assert fill(slots, held, "sess-y", kind) == 0  # its cap, not the total
        with pytest.raises(BusError) as refused, slots.hold("take work", "sess-y", "work"):
            pass
        assert refused.value.details == {"session_id": "sess-y", "limit": 3}
