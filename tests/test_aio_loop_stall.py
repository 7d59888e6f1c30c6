"""An asyncio client whose event loop is blocked for a while (a handler that does blocking work: a
worker's CPU-bound task, an agent's synchronous tool call) stays a live caller for the broker: the
broker drops a peer it hears no heartbeat from for `heartbeat_interval x heartbeat_liveness`, answering
its calls in flight UNAVAILABLE and forgetting an agent's subscription on its connection, which the
client would never send again."""

from __future__ import annotations

import asyncio
import time

import pytest

from baaaht.bus.aio import AsyncBusClient
from baaaht.bus.testing import run_async
from baaaht.schemas.sessions import SessionCreate, SessionSendMessage
from tests.services.echo import Say

# The broker forgets a silent peer after 12 x 200 ms: the loop below is blocked well past that (and the
# expiry is long enough that a loaded machine's stalls of the keep-alive thread do not reach it).
QUICK_EXPIRY = {"bus": {"heartbeat_interval": "200ms", "heartbeat_liveness": 12}}
BLOCKED = 4.0


@pytest.fixture
def quick(make_host):
    return make_host(QUICK_EXPIRY)


def client_of(host, endpoint: str) -> AsyncBusClient:
    bus = host.config.bus
    return AsyncBusClient(
        endpoint,
        timeout=10,
        heartbeat_interval=float(bus.heartbeat_interval),
        liveness=bus.heartbeat_liveness,
    )


def test_a_call_in_flight_is_answered_though_the_loop_was_blocked_past_the_brokers_expiry(quick):
    quick.start_service("tests/services/echo.py", "echo")

    async def scenario():
        async with client_of(quick, quick.endpoints.services) as bus:
            assert (await bus.call(Say(text="warm"))).text == "warm"
            pending = asyncio.ensure_future(bus.call(Say(text="slow", delay=BLOCKED + 0.5)))
            await asyncio.sleep(0.2)  # the request is out
            time.sleep(BLOCKED)  # blocking work on the loop
            assert (await pending).text == "slow"

    run_async(scenario(), timeout=30)


def test_an_agents_subscription_holds_though_its_loop_was_blocked_past_the_brokers_expiry(quick):
    quick.start_service("baaaht.services.sessions", "session")
    operator = quick.client()
    session = operator.call(SessionCreate(owner="alice")).id
    quick.identify(session)

    async def scenario():
        async with client_of(quick, quick.endpoints.agents) as agent:
            contents: asyncio.Queue[str] = asyncio.Queue()

            async def follow():
                async for delivery in agent.subscribe([f"session.message/{session}"]):
                    contents.put_nowait(delivery.event.message.content)

            follower = asyncio.ensure_future(follow())
            try:
                # The first message shows the subscription is in place (it may replay from "now" on).
                while True:
                    await asyncio.to_thread(
                        operator.call, SessionSendMessage(session_id=session, content="1")
                    )
                    try:
                        assert await asyncio.wait_for(contents.get(), 1.0) == "1"
                        break
                    except TimeoutError:
                        continue
                time.sleep(BLOCKED)  # blocking work on the agent's loop
                await asyncio.to_thread(operator.call, SessionSendMessage(session_id=session, content="2"))
                assert await asyncio.wait_for(contents.get(), 5.0) == "2"
            finally:
                follower.cancel()

    run_async(scenario(), timeout=60)
