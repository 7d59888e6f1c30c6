"""The scheduler's stream slots (services/scheduler/streams.py): a few hostile sessions at their cap must
not take every stream, a session's worker and host workers always get task.work."""

from __future__ import annotations

import contextlib

import pytest

from baaaht.bus.errors import BusError
from baaaht.schemas.errors import ErrorCode
from baaaht.services.scheduler.service import MAX_STREAMS, SESSION_STREAMS, WORK_STREAMS
from baaaht.services.scheduler.streams import HOST, StreamSlots


def fill(slots: StreamSlots, held: contextlib.ExitStack, scope, *, work: bool) -> int:
    """Open streams for `scope` until refused; how many it got."""
    got = 0
    while True:
        try:
            held.enter_context(slots.hold("test", scope, work=work))
        except BusError as error:
            assert error.code is ErrorCode.RESOURCE_EXHAUSTED
            return got
        got += 1


@pytest.mark.parametrize("work", [True, False], ids=["task.work", "task.wait"])
def test_hostile_sessions_at_their_cap_leave_every_other_sessions_worker_a_stream(work):
    slots = StreamSlots(MAX_STREAMS, SESSION_STREAMS, WORK_STREAMS)
    with contextlib.ExitStack() as held:
        hostile = [fill(slots, held, f"sess-hostile-{n}", work=work) for n in range(4)]
        assert all(n <= SESSION_STREAMS for n in hostile)
        assert sum(hostile) < MAX_STREAMS
        for n in range(16):  # other sessions' workers, one stream each
            held.enter_context(slots.hold("take work", f"sess-{n}", work=True))
        held.enter_context(slots.hold("take work", HOST, work=True))
        assert slots.open <= MAX_STREAMS


def test_the_reserve_gives_a_session_one_stream_and_host_workers_as_many_as_it_has():
    slots = StreamSlots(total=10, per_session=8, work_reserve=4)
    with contextlib.ExitStack() as held:
        assert fill(slots, held, "sess-a", work=False) == 6  # the shared part only
        assert fill(slots, held, "sess-a", work=True) == 1
        assert fill(slots, held, "sess-b", work=False) == 0
        assert fill(slots, held, "sess-b", work=True) == 1
        assert fill(slots, held, HOST, work=True) == 2
        assert fill(slots, held, "sess-c", work=True) == 0
        assert slots.open == 10
    assert slots.open == 0
    with slots.hold("take work", "sess-c", work=True):  # all given back
        assert slots.open == 1


def test_a_sessions_cap_counts_its_streams_in_the_reserve_too():
    slots = StreamSlots(total=10, per_session=3, work_reserve=4)
    with contextlib.ExitStack() as held:
        assert fill(slots, held, "sess-x", work=False) == 3
        assert fill(slots, held, "sess-y", work=False) == 3
        assert fill(slots, held, "sess-y", work=True) == 0  # its cap, not the total
        with pytest.raises(BusError) as refused, slots.hold("take work", "sess-y", work=True):
            pass
        assert refused.value.details == {"session_id": "sess-y", "limit": 3}
