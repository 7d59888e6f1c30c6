"""Both client faces when things go wrong: broker killed or hung, deadlines, clean departure.

Real broker and service processes (the test kit's Host); a bare ROUTER stands in for a
broker that accepts connections and never answers.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zmq

from baaaht.bus import wire
from baaaht.bus.aio import AsyncBusClient
from baaaht.bus.client import BusClient
from baaaht.bus.errors import BusError
from baaaht.bus.protocol import DEADLINE_GRACE, is_broker_unreachable
from baaaht.bus.testing import run_async, wait_for
from baaaht.schemas.bus import BusPeers, BusPing, BusServices, BusStats
from baaaht.schemas.errors import ErrorCode
from tests.conftest import ECHO_SERVICE
from tests.services.echo import Count, Say, SeenQuery, Shout

CLIENTS = 8
CTL = str(Path(sys.executable).parent / "baaaht-ctl")


def in_flight(host) -> int:
    services = host.client(timeout=1).call(BusServices(service="echo")).services
    return sum(i.in_flight for s in services for i in s.instances)


def socket_file(host) -> tuple[int, int] | None:
    """Which socket file is bound now (a new broker replaces the one a killed broker left)."""
    try:
        found = os.stat(os.path.join(host.run_dir, "bus.sock"))
    except FileNotFoundError:
        return None
    return found.st_ino, found.st_ctime_ns


def restart_broker(host) -> float:
    """Start a new broker; the monotonic time at which it has bound the services socket."""
    before = socket_file(host)
    host.spawn("broker", ["-m", "baaaht.bus.broker"])
    wait_for(lambda: socket_file(host) not in (None, before), interval=0.005, what="the new broker to bind")
    return time.monotonic()


def report(what: str, seconds: list[float]) -> None:
    print(f"{what}: min {min(seconds) * 1000:.0f} ms, max {max(seconds) * 1000:.0f} ms", file=sys.stderr)


# -- a killed broker ------------------------------------------------------------------------------


@pytest.fixture
def slow_beats(make_host):
    """An echo host whose heartbeats are too slow (1 s, liveness 3 s) to explain a fast failover."""
    host = make_host({"bus": {"heartbeat_interval": "1s"}})
    host.start_service(ECHO_SERVICE, "echo")
    return host


def test_blocking_clients_learn_of_a_killed_broker_at_once_and_are_served_again_soon(slow_beats):
    echo = slow_beats
    clients = [echo.client(timeout=30) for _ in range(CLIENTS)]
    failed_at: dict[int, tuple[ErrorCode, float]] = {}
    served_at: dict[int, float] = {}
    restarted = threading.Event()

    def caller(index: int) -> None:
        try:
            clients[index].call(Say(text="x", delay=20), timeout=30)
        except BusError as exc:
            failed_at[index] = (exc.code, time.monotonic())
        restarted.wait(15)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                clients[index].call(Say(text="after"), timeout=1)
                served_at[index] = time.monotonic()
                return
            except BusError:
                time.sleep(0.01)  # UNAVAILABLE until the service has registered again

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    wait_for(lambda: in_flight(echo) == CLIENTS, what="every call to be in flight")
    killed_at = time.monotonic()
    echo.kill("broker", signal.SIGKILL)
    wait_for(lambda: len(failed_at) == CLIENTS, timeout=5, interval=0.01, what="every caller's error")
    assert {code for code, _ in failed_at.values()} == {ErrorCode.UNAVAILABLE}
    # While the broker is away a new call fails UNAVAILABLE, naming the endpoint, at its deadline.
    with pytest.raises(BusError) as caught:
        echo.client(timeout=0.2).call(BusPing())
    assert is_broker_unreachable(caught.value)
    back_at = restart_broker(echo)
    restarted.set()
    for thread in threads:
        thread.join(20)
    assert len(served_at) == CLIENTS
    errors = [at - killed_at for _, at in failed_at.values()]
    served = [at - back_at for at in served_at.values()]
    report("blocking: error after the kill", errors)
    report("blocking: served after the broker's return", served)
    assert max(errors) < 1.0  # generous: the monitor reports the disconnect within milliseconds
    assert max(served) < 4.0
    # Its handlers of calls made through the killed broker can never reply (a new broker has no route
    # back), yet a graceful stop waits the drain timeout for them: leave at once.
    echo.kill("echo")


def test_async_clients_learn_of_a_killed_broker_at_once_and_are_served_again_soon(slow_beats):
    echo = slow_beats

    async def scenario():
        clients = [AsyncBusClient.for_config(echo.config, timeout=30) for _ in range(CLIENTS)]
        restarted = asyncio.Event()
        failed_at: list[float] = []
        served_at: list[float] = []

        async def caller(bus: AsyncBusClient) -> None:
            with pytest.raises(BusError) as caught:
                await bus.call(Say(text="x", delay=20))
            assert caught.value.code == ErrorCode.UNAVAILABLE
            failed_at.append(time.monotonic())
            await restarted.wait()
            while True:
                try:
                    await bus.call(Say(text="after"), timeout=1)
                    served_at.append(time.monotonic())
                    return
                except BusError:
                    await asyncio.sleep(0.01)  # UNAVAILABLE until the service has registered again

        tasks = [asyncio.create_task(caller(bus)) for bus in clients]
        await asyncio.to_thread(wait_for, lambda: in_flight(echo) == CLIENTS, what="every call in flight")
        killed_at = time.monotonic()
        echo.kill("broker", signal.SIGKILL)
        while len(failed_at) < CLIENTS:
            await asyncio.sleep(0.005)
        back_at = await asyncio.to_thread(restart_broker, echo)
        restarted.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 20)
        for bus in clients:
            await bus.close()
        return [at - killed_at for at in failed_at], [at - back_at for at in served_at]

    errors, served = run_async(scenario())
    report("asyncio: error after the kill", errors)
    report("asyncio: served after the broker's return", served)
    assert max(errors) < 1.0
    assert max(served) < 4.0
    # Its handlers of calls made through the killed broker can never reply (a new broker has no route
    # back), yet a graceful stop waits the drain timeout for them: leave at once.
    echo.kill("echo")


def test_a_service_registers_again_promptly_after_a_broker_restart(make_host):
    # With heartbeats this slow, only registering on connect (not the broker's "register again"
    # answer to a heartbeat) can explain a registration within 2 s of the broker's return.
    echo = make_host({"bus": {"heartbeat_interval": "30s"}})
    echo.start_service(ECHO_SERVICE, "echo")
    pid = echo.processes["echo"].pid
    echo.kill("broker", signal.SIGKILL)
    back_at = restart_broker(echo)
    probe = echo.client(timeout=1)

    def registered():
        return any(
            i.pid == pid for s in probe.call(BusServices(service="echo")).services for i in s.instances
        )

    wait_for(registered, interval=0.01, what="the echo service to register with the new broker")
    took = time.monotonic() - back_at
    print(f"service registered {took * 1000:.0f} ms after the broker's return", file=sys.stderr)
    assert took < 2.0


# -- a hung broker, a killed service, deadlines and cancellation on the asyncio face ---------------


def test_async_client_recovers_from_a_hung_broker_through_heartbeats(echo):
    broker = echo.processes["broker"]

    async def scenario():
        async with AsyncBusClient.for_config(echo.config, timeout=30) as bus:
            assert (await bus.call(Say(text="before"))).text == "before"
            broker.send_signal(signal.SIGSTOP)
            try:
                started = time.monotonic()
                with pytest.raises(BusError) as caught:
                    await bus.call(Say(text="hung"))
                assert is_broker_unreachable(caught.value)
                silence = float(echo.config.bus.heartbeat_interval) * echo.config.bus.heartbeat_liveness
                assert time.monotonic() - started < silence + 2
            finally:
                broker.send_signal(signal.SIGCONT)
            while True:
                try:
                    return (await bus.call(Say(text="after"), timeout=1)).text
                except BusError:
                    await asyncio.sleep(0.05)

    assert run_async(scenario(), timeout=30) == "after"


def test_async_call_to_a_killed_service_fails_and_a_new_instance_serves(echo):
    async def scenario():
        async with AsyncBusClient.for_config(echo.config, timeout=30) as bus:
            slow = asyncio.create_task(bus.call(Say(text="x", delay=20)))
            await asyncio.to_thread(wait_for, lambda: in_flight(echo) == 1, what="the call in flight")
            echo.kill("echo", signal.SIGKILL)
            with pytest.raises(BusError) as caught:
                await slow
            assert caught.value.code == ErrorCode.UNAVAILABLE
            await asyncio.to_thread(echo.start_service, ECHO_SERVICE, "echo")
            return (await bus.call(Say(text="again"))).text

    assert run_async(scenario()) == "again"


def test_cancelling_an_async_call_cancels_it_at_the_service(echo):
    async def scenario():
        async with AsyncBusClient.for_config(echo.config, timeout=30) as bus:
            slow = asyncio.create_task(bus.call(Say(text="x", delay=20)))
            await asyncio.to_thread(wait_for, lambda: in_flight(echo) == 1, what="the call in flight")
            slow.cancel()
            with pytest.raises(asyncio.CancelledError):
                await slow
            await asyncio.to_thread(wait_for, lambda: in_flight(echo) == 0, what="the handler to stop")
            stream = bus.stream(Count(to=1000, interval=0.01))
            assert (await anext(stream)).n == 0
            reader = asyncio.create_task(anext(stream))
            await asyncio.sleep(0)
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            await stream.aclose()

    run_async(scenario())
    client = echo.client()
    wait_for(lambda: client.call(SeenQuery()).cancelled_streams == 1, what="the stream's handler to stop")


def test_async_stream_of_a_killed_broker_ends_with_unavailable(echo):
    async def scenario():
        async with AsyncBusClient.for_config(echo.config, timeout=30) as bus:
            stream = bus.stream(Count(to=100_000, interval=0.01))
            assert (await anext(stream)).n == 0
            echo.kill("broker", signal.SIGKILL)
            with pytest.raises(BusError) as caught:
                async for _ in stream:
                    pass
            return caught.value

    assert is_broker_unreachable(run_async(scenario()))
    # Its handlers of calls made through the killed broker can never reply (a new broker has no route
    # back), yet a graceful stop waits the drain timeout for them: leave at once.
    echo.kill("echo")


# -- a connected broker that never answers --------------------------------------------------------


def received_kinds(router: zmq.Socket, until: bytes, timeout: float = 5.0) -> list[bytes]:
    kinds = []
    deadline = time.monotonic() + timeout
    while until not in kinds and router.poll(max(0.0, deadline - time.monotonic()) * 1000):
        kinds.append(wire.kind_of(router.recv_multipart()[1]))
    return kinds


def test_no_reply_by_the_deadline_is_timeout_from_both_faces(silent_broker):
    _run_dir, endpoint, router = silent_broker
    with BusClient(endpoint, timeout=0.3) as bus:
        started = time.monotonic()
        with pytest.raises(BusError) as caught:
            bus.call(BusPing())
        took = time.monotonic() - started
    assert caught.value.code == ErrorCode.TIMEOUT and not is_broker_unreachable(caught.value)
    assert 0.3 <= took < 0.3 + DEADLINE_GRACE + 0.5

    async def scenario():
        async with AsyncBusClient(endpoint, timeout=0.3) as bus:
            with pytest.raises(BusError) as caught:
                await bus.call(BusPing())
            return caught.value

    error = run_async(scenario())
    assert error.code == ErrorCode.TIMEOUT and not is_broker_unreachable(error)


def test_ctl_reports_a_deadline_as_timeout_not_as_a_missing_host(silent_broker, tmp_path):
    run_dir, _endpoint, _router = silent_broker
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"bus": {"run_dir": run_dir}, "data_dir": str(tmp_path)}))
    result = subprocess.run(
        [CTL, "--config", str(config), "--timeout", "0.5", "ping"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1, result.stderr
    assert "TIMEOUT" in result.stderr and "is the host running" not in result.stderr


@pytest.mark.parametrize("face", ["blocking", "asyncio"])
def test_a_closing_client_tells_the_broker(silent_broker, face):
    _run_dir, endpoint, router = silent_broker
    if face == "blocking":
        bus = BusClient(endpoint)
        wait_for(lambda: bus.connection.core.connected, what="the client to connect")
        bus.close()
    else:

        async def scenario():
            async with AsyncBusClient(endpoint) as bus:
                while not bus.connected:
                    await asyncio.sleep(0.01)

        run_async(scenario(), timeout=10)
    assert wire.DISCONNECT in received_kinds(router, until=wire.DISCONNECT)


def test_closed_clients_leave_the_broker_at_once_and_count_no_errors(make_host):
    host = make_host({"bus": {"heartbeat_interval": "1s"}})
    probe = host.client()
    staying = len(probe.call(BusPeers()).peers)  # the probe and the harness's own
    for _ in range(3):
        with BusClient.for_config(host.config) as bus:
            bus.call(BusPing())

    def closed_ones_gone():
        return len(probe.call(BusPeers()).peers) == staying

    # Well before the 3 s in which a silent peer would expire (and its heartbeats be counted unroutable).
    wait_for(closed_ones_gone, timeout=1.5, interval=0.02, what="the closed clients to leave")
    assert "unroutable" not in probe.call(BusStats()).errors


# -- the asyncio face's own driver (bus/aio_connection.py) -----------------------------------------


def test_async_replies_that_arrive_while_calls_are_sent_are_read_at_once(make_host):
    """ZeroMQ's FD says only that something changed, and a send can take that signal: a reply that came
    in meanwhile must still be read, not left until the next heartbeat (30 s here, past every deadline)."""
    host = make_host({"bus": {"heartbeat_interval": "30s"}})

    async def scenario():
        async with AsyncBusClient.for_config(host.config) as bus:

            async def caller() -> None:
                for _ in range(40):
                    await bus.call(BusPing(), timeout=2)

            await asyncio.gather(*(caller() for _ in range(CLIENTS * 8)))

    run_async(scenario(), timeout=120)


def test_events_published_in_one_turn_of_the_loop_go_out_as_one_message_before_what_follows(silent_broker):
    _run_dir, endpoint, router = silent_broker

    async def scenario():
        async with AsyncBusClient(endpoint, timeout=0.3) as bus:
            while not bus.connected:
                await asyncio.sleep(0.01)
            for n in range(3):
                await bus.publish(Shout(text=str(n)))
            with pytest.raises(BusError):
                await bus.call(BusPing())

    run_async(scenario(), timeout=10)
    kinds = [kind for kind in received_kinds(router, until=wire.REQUEST) if kind != wire.HEARTBEAT]
    assert kinds == [wire.EVENTS, wire.REQUEST]


def test_a_call_on_a_closed_async_client_is_cancelled_at_once(silent_broker):
    _run_dir, endpoint, _router = silent_broker

    async def scenario():
        bus = AsyncBusClient(endpoint, timeout=5)
        await bus.close()
        with pytest.raises(BusError) as caught:
            await bus.call(BusPing())
        return caught.value

    error = run_async(scenario(), timeout=30)
    assert error.code == ErrorCode.CANCELLED, error


def test_an_async_client_belongs_to_the_event_loop_it_was_first_used_on(silent_broker):
    _run_dir, endpoint, _router = silent_broker

    async def made() -> AsyncBusClient:
        return AsyncBusClient(endpoint, timeout=0.3)

    bus = run_async(made())

    async def used_elsewhere():
        with pytest.raises(RuntimeError, match="another event loop"):
            await bus.call(BusPing())
        await bus.close()

    run_async(used_elsewhere(), timeout=10)
