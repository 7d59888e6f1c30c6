"""A blocking client shared by threads stays usable when an exception from a signal handler (Ctrl-C's
KeyboardInterrupt) ends one caller's wait: the connection is never left led by a caller that is gone."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from baaaht.bus.errors import BusError
from baaaht.bus.testing import wait_for
from baaaht.schemas.bus import BusPing, BusServices
from tests.services.echo import Say


class Interrupted(Exception):
    pass


@pytest.fixture
def interrupt_soon():
    """`interrupt_soon(seconds)`: the main thread gets Interrupted raised from a signal handler then."""

    def raise_interrupted(*_):
        raise Interrupted()

    previous = signal.signal(signal.SIGUSR1, raise_interrupted)
    timers: list[threading.Timer] = []

    def schedule(seconds: float) -> None:
        timer = threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGUSR1))
        timers.append(timer)
        timer.start()

    yield schedule
    for timer in timers:
        timer.cancel()
    signal.signal(signal.SIGUSR1, previous)


def test_a_caller_interrupted_while_another_thread_leads_leaves_the_connection_usable(echo, interrupt_soon):
    client = echo.client(timeout=10)
    client.call(BusPing())
    led: list[str] = []
    leader = threading.Thread(target=lambda: led.append(client.call(Say(text="led", delay=1.0)).text))
    leader.start()
    probe = echo.client()

    def led_call_at_the_service() -> bool:
        return probe.call(BusServices(service="echo")).services[0].instances[0].in_flight == 1

    wait_for(led_call_at_the_service, what="the other thread's call to reach the service")
    interrupt_soon(0.3)  # while the main thread waits for its call, the other thread leading
    with pytest.raises(Interrupted):
        client.call(Say(text="interrupted", delay=3.0))
    leader.join(10)
    assert led == ["led"]
    try:
        assert client.call(Say(text="after"), timeout=3).text == "after"
    except BusError as exc:  # the connection was left to the interrupted caller: nobody reads it
        pytest.fail(f"the call after the interrupt failed: {exc.code.value} {exc.message}")
