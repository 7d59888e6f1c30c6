"""Agents' bus.events.replay has a byte budget (limits.agent_replay_bytes_per_second): the broker
builds and encodes each answer on its loop, and one agent container looping replays of its session's
kept events (16 MiB, published within its quotas) took the operator's bus.ping from 0.17 ms to 409 ms
(p50). An agent's subscription that meets the refusal while it catches up waits and asks again."""

from __future__ import annotations

import time

import pytest

from baaaht.bus.aio import AsyncBusClient
from baaaht.bus.subscription import REPLAY_PAGE
from baaaht.bus.testing import error_of, run_async
from baaaht.schemas.base import Event
from baaaht.schemas.bus import BusEventsReplay
from baaaht.schemas.errors import ErrorCode

BUDGET = 64 * 1024  # bytes of replayed events a second


class Blob(Event, tag="agent.blob", kw_only=True):
    data: bytes


@pytest.fixture
def host(make_host):
    host = make_host({"limits": {"agent_replay_bytes_per_second": BUDGET, "agent_event_history": 2000}})
    host.identify("sess-replay", role="agent")
    return host


def test_an_agent_is_refused_replays_past_its_byte_budget_and_the_operator_is_not(host):
    agent = host.agent_client(timeout=10.0)
    for _ in range(4):
        agent.publish(Blob(data=b"x" * 50_000))  # 200 kB kept in its session: 3 s of the budget
    whole = BusEventsReplay(since=0, topics=["agent."], limit=100)
    first = agent.call(whole)  # goes out while the agent has budget left, whatever its size
    assert len(first.events) == 4
    refused = error_of(lambda: agent.call(whole))
    assert refused.code is ErrorCode.RESOURCE_EXHAUSTED
    assert "limits.agent_replay_bytes_per_second" in refused.message and "try again in" in refused.message
    operator = host.client(timeout=10.0)
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
