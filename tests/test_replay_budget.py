"""Agents' bus.events.replay has a byte budget (limits.agent_replay_bytes_per_second): the broker
builds and encodes each answer on its loop, and one agent container looping replays of its session's
kept events (16 MiB, published within its quotas) took the operator's bus.ping from 0.17 ms to 409 ms
(p50). An agent's subscription that meets the refusal while it catches up waits and asks again."""

from __future__ import annotations

import threading
import time

import pytest

from baaaht.bus.aio import AsyncBusClient
from baaaht.bus.errors import BusError
from baaaht.bus.registry import REPLAY_SCAN_BYTES
from baaaht.bus.subscription import REPLAY_PAGE
from baaaht.bus.testing import error_of, run_async, wait_for
from baaaht.schemas.base import Event
from baaaht.schemas.bus import BusEventsReplay
from baaaht.schemas.errors import ErrorCode

BUDGET = 64 * 1024  # bytes of replayed events a second, and the largest event (the budget's floor)


class Blob(Event, tag="agent.blob", kw_only=True):
    data: bytes


@pytest.fixture
def host(make_host):
    host = make_host(
        {
            "bus": {"max_event_size": BUDGET},
            "limits": {"agent_replay_bytes_per_second": BUDGET, "agent_event_history": 2000},
        }
    )
    host.identify("sess-replay", role="agent")
    return host


def test_an_agent_is_refused_replays_past_its_byte_budget_and_the_operator_is_not(host):
    agent = host.agent_client(timeout=10.0)
    for _ in range(4):
        agent.publish(Blob(data=b"x" * 50_000))  # 200 kB kept in its session: 3 s of the budget
    whole = BusEventsReplay(since=0, topics=["agent."], limit=100)
    operator = host.client(timeout=10.0)
    wait_for(lambda: len(operator.call(whole).events) == 4, timeout=5, what="the 4 blobs to be kept")
    first = agent.call(whole)  # cut at what the budget holds: one of 50 kB, not two
    assert len(first.events) == 1 and first.more
    second = agent.call(BusEventsReplay(since=first.events[0].seq, topics=["agent."], limit=100))
    assert len(second.events) == 1 and second.more  # 15 kB were left: the first event whatever its size
    refused = error_of(lambda: agent.call(whole))
    assert refused.code is ErrorCode.RESOURCE_EXHAUSTED
    assert "limits.agent_replay_bytes_per_second" in refused.message and "try again in" in refused.message
    assert refused.details["limit"] == "limits.agent_replay_bytes_per_second"
    assert 0 < refused.details["retry_after"] <= 100_000 / BUDGET  # its debt at the refill's rate
    assert len(operator.call(BusEventsReplay(since=0, topics=["agent."], limit=100)).events) == 4


def published_past_a_page(agent) -> int:
    """More events than a replay page (bus/subscription.py REPLAY_PAGE): two replays, 230 kB."""
    sent = REPLAY_PAGE + 100
    for _ in range(sent):
        agent.publish(Blob(data=b"x" * 200))
        time.sleep(1 / 150)  # within limits.agent_events_per_second (200)
    return sent


def test_an_agents_subscription_catching_up_past_its_budget_waits_and_gets_every_event(host):
    agent = host.agent_client(timeout=30.0)
    sent = published_past_a_page(agent)
    with agent.subscribe(["agent."], since=0) as events:
        seqs = [events.next(timeout=30.0).seq for _ in range(sent)]
    assert len(set(seqs)) == sent


def test_so_does_the_asyncio_faces(host):
    sent = published_past_a_page(host.agent_client(timeout=30.0))

    async def take_all() -> list[int]:
        seqs: list[int] = []
        async with AsyncBusClient(host.endpoints.agents, timeout=30.0) as bus:
            async for delivery in bus.subscribe(["agent."], since=0):
                seqs.append(delivery.seq)
                if len(seqs) == sent:
                    return seqs
        return seqs

    assert len(set(run_async(take_all(), 60, "every event through a refused replay"))) == sent


def put_in_debt(host, agent) -> None:
    """Most of a second of the budget's debt, as deep as one page goes (the budget is at least the
    largest event): a page that leaves just over a tenth of a second's bytes, then one of 60 kB."""
    agent.publish(Blob(data=b"x" * 57_000))
    agent.publish(Blob(data=b"x" * 60_000))
    whole = BusEventsReplay(since=0, topics=["agent."], limit=100)
    operator = host.client()
    wait_for(lambda: len(operator.call(whole).events) == 2, timeout=5, what="the 2 blobs to be kept")
    [first] = agent.call(BusEventsReplay(since=0, topics=["agent."], limit=1)).events
    assert len(agent.call(BusEventsReplay(since=first.seq, topics=["agent."], limit=1)).events) == 1


def test_an_agent_looping_replays_that_match_nothing_is_refused_for_the_events_they_scan(host):
    """Such a replay sends nothing but looks at every kept event on the broker's loop: it was charged
    nothing and never refused."""
    agent = host.agent_client(timeout=10.0)
    for _ in range(100):
        agent.publish(Blob(data=b"x"))
    mine = BusEventsReplay(since=0, topics=["agent."], limit=1000)
    operator = host.client()
    wait_for(lambda: len(operator.call(mine).events) == 100, timeout=5, what="the 100 events to be kept")
    nothing = BusEventsReplay(since=0, topics=["agent.nosuch"], limit=1000)
    paid_for = BUDGET // (100 * REPLAY_SCAN_BYTES)  # such replays its budget holds: each scans 100 or more
    answered = 0
    while answered < 100:
        try:
            assert agent.call(nothing).events == []
        except BusError as refused:
            assert refused.code is ErrorCode.RESOURCE_EXHAUSTED and refused.details["retry_after"] > 0
            break
        answered += 1
    assert answered <= paid_for + 2  # and what the refill paid for while they ran


def test_an_agent_in_debt_is_still_told_the_numbers_and_may_subscribe_from_now(host):
    """A replay with limit 0 sends no event: refusing it only held up a subscription "from now"."""
    agent = host.agent_client(timeout=10.0)
    put_in_debt(host, agent)
    refused = error_of(lambda: agent.call(BusEventsReplay(topics=["agent."])))
    assert refused.code is ErrorCode.RESOURCE_EXHAUSTED
    started = time.monotonic()
    assert agent.call(BusEventsReplay(limit=0)).last_seq >= 2
    with agent.subscribe(["agent."]) as events:
        agent.publish(Blob(data=b"now"))
        assert events.next(timeout=5.0).event == Blob(data=b"now")
    assert time.monotonic() - started < refused.details["retry_after"]  # nothing waited the debt out


def test_a_catch_up_refused_for_longer_than_the_call_timeout_fails_instead_of_waiting_on(host):
    """Every wait has a timeout: a catch-up refused past the client's call timeout raises the refusal."""
    put_in_debt(host, host.agent_client(timeout=10.0))
    agent = host.agent_client(timeout=0.3)  # the same container: the same debt, of most of a second
    outcome: list = []

    def subscribe() -> None:
        try:
            agent.subscribe(["agent."], since=0).close()
            outcome.append("subscribed")
        except BusError as error:
            outcome.append(error)

    thread = threading.Thread(target=subscribe)
    thread.start()
    thread.join(10)
    [error] = outcome
    assert isinstance(error, BusError) and error.code is ErrorCode.RESOURCE_EXHAUSTED
    assert error.details["retry_after"] > 0


def test_so_does_an_asyncio_catch_up(host):
    put_in_debt(host, host.agent_client(timeout=10.0))

    async def subscribe() -> None:
        async with AsyncBusClient(host.endpoints.agents, timeout=0.3) as bus:
            events = bus.subscribe(["agent."], since=0)
            try:
                await events.__anext__()
            finally:
                await events.aclose()

    with pytest.raises(BusError) as caught:
        run_async(subscribe(), 10, "the refused asyncio catch-up")
    assert caught.value.code is ErrorCode.RESOURCE_EXHAUSTED
