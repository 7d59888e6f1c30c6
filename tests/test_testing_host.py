"""The test kit's waits on a real host: events on a subscription, a service's registration."""

from __future__ import annotations

import concurrent.futures
import signal
import time

import pytest

from baaaht.bus.testing import next_event
from baaaht.schemas.bus import BusPing
from tests.services.echo import Emit, Say, Shout


def test_next_event_on_a_subscription_names_what_it_waited_for(echo):
    client = echo.client()
    with client.subscribe(["echo."]) as events:
        client.call(Say(text="no event"))
        with pytest.raises(AssertionError, match="waiting for a shout; other topics seen: \\[\\]"):
            next_event(events, timeout=0.3, what="a shout")
        client.call(Emit(text="one", times=1))
        assert next_event(events, timeout=10, what="a shout").event == Shout(text="one")


def test_waiting_for_a_registration_that_never_comes_names_the_service(host):
    with pytest.raises(AssertionError, match=r"waiting for service nosuch \(pid 1\) to register"):
        host.wait_registered("nosuch", pid=1, timeout=0.5)


def test_a_call_in_flight_rides_out_a_stall_shorter_than_the_kits_liveness(host):
    # A loaded machine stalls processes for a second or more: a kit host's client must not take that
    # for a lost broker (it did with 3 x 200 ms: "lost the broker", the call failed UNAVAILABLE).
    client = host.client(timeout=10)
    broker = host.processes["broker"]
    assert client.call(BusPing()).broker_pid == broker.pid
    broker.send_signal(signal.SIGSTOP)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(client.call, BusPing())
            time.sleep(1.5)  # the stall itself: over the old 0.6 s of silence, under the kit's 5 s
            broker.send_signal(signal.SIGCONT)
            assert pending.result(timeout=10).broker_pid == broker.pid
    finally:
        broker.send_signal(signal.SIGCONT)
