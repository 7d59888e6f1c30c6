"""The asyncio client against a real broker and a real service process."""

import asyncio

import pytest

from baaaht.bus.aio import AsyncBusClient
from baaaht.bus.errors import BusError
from baaaht.bus.protocol import is_broker_unreachable
from baaaht.bus.testing import run_async, wait_for
from baaaht.schemas.bus import BusPing
from baaaht.schemas.errors import ErrorCode
from tests.services.echo import Count, Emit, Fail, Say, SeenQuery, Shout


def test_calls_errors_and_concurrency(echo):
    async def scenario():
        async with AsyncBusClient.for_config(echo.config) as bus:
            assert (await bus.call(BusPing())).caller.socket == "services"
            said = await asyncio.gather(*(bus.call(Say(text=str(n), delay=0.05)) for n in range(20)))
            assert [s.text for s in said] == [str(n) for n in range(20)]
            with pytest.raises(BusError) as caught:
                await bus.call(Fail(code="PERMISSION_DENIED"))
            assert caught.value.code == ErrorCode.PERMISSION_DENIED
            with pytest.raises(BusError) as caught:
                await bus.call(Say(text="slow", delay=10), timeout=0.3)
            assert caught.value.code == ErrorCode.TIMEOUT

    run_async(scenario(), timeout=30)


def test_stream_and_cancel(echo):
    async def scenario():
        async with AsyncBusClient.for_config(echo.config) as bus:
            assert [t.n async for t in bus.stream(Count(to=4))] == [0, 1, 2, 3]
            items = bus.stream(Count(to=1000, interval=0.01))
            assert (await items.__anext__()).n == 0
            await items.aclose()

    run_async(scenario(), timeout=30)
    client = echo.client()
    wait_for(
        lambda: client.call(SeenQuery()).cancelled_streams == 1, what="the handler to see the cancellation"
    )


def test_subscribe_with_replay(echo):
    async def scenario():
        async with AsyncBusClient.for_config(echo.config) as bus:
            await bus.call(Emit(text="early", times=2))
            events = bus.subscribe(["echo."], since=0)
            got = [await events.__anext__() for _ in range(2)]
            assert [d.event for d in got] == [Shout(text="early")] * 2
            await bus.call(Emit(text="live"))
            assert (await events.__anext__()).event == Shout(text="live")
            await events.aclose()

    run_async(scenario(), timeout=30)


def test_unreachable_broker_is_unavailable_at_the_deadline(tmp_path):
    async def scenario():
        async with AsyncBusClient(f"ipc://{tmp_path}/nobody.sock", timeout=0.3) as bus:
            with pytest.raises(BusError) as caught:
                await bus.call(BusPing())
            assert is_broker_unreachable(caught.value)

    run_async(scenario(), timeout=30)


def test_stream_to_hands_each_partial_over_as_it_is_read(echo):
    async def scenario():
        async with AsyncBusClient.for_config(echo.config) as bus:
            got = []
            await bus.stream_to(Count(to=4), lambda tick: got.append(tick.n))
            assert got == [0, 1, 2, 3]
            with pytest.raises(BusError) as caught:
                await bus.stream_to(Count(to=1000, interval=0.05), got.append, timeout=0.3)
            assert caught.value.code == ErrorCode.TIMEOUT

    run_async(scenario(), timeout=30)


def test_what_the_taker_of_a_stream_to_raises_reaches_its_caller_and_cancels_the_call(echo):
    def refuse(tick) -> None:
        raise ValueError(f"not {tick.n}")

    async def scenario():
        async with AsyncBusClient.for_config(echo.config) as bus:
            with pytest.raises(ValueError, match="not 0"):
                await bus.stream_to(Count(to=1000, interval=0.01), refuse)
            assert (await bus.call(BusPing())).caller.socket == "services"  # the connection reads on

    run_async(scenario(), timeout=30)
    client = echo.client()
    wait_for(
        lambda: client.call(SeenQuery()).cancelled_streams == 1, what="the handler to see the cancellation"
    )
