"""What a hostile agent or a buggy service can do to the bus, and what it must not."""

from __future__ import annotations

import concurrent.futures
import signal
import time

import msgspec
import pytest

from baaaht.bus import wire
from baaaht.bus.testing import wait_for
from baaaht.schemas.bus import BusEventsReplay, BusServices
from tests.services.echo import Say
from tests.test_bus import next_reply, raw_dealer


def echo_in_flight(probe) -> int | None:
    for service in probe.call(BusServices(service="echo")).services:
        for instance in service.instances:
            return instance.in_flight if instance.healthy else None
    return None


def test_a_reply_from_before_a_broker_restart_never_answers_a_newer_call(echo):
    """Tokens name requests in flight; a restarted broker must not hand out the token of a call that
    a service is still finishing for the previous broker, or that call's reply answers a stranger."""
    old_caller, new_caller, probe = echo.client(timeout=10), echo.client(timeout=10), echo.client()
    with concurrent.futures.ThreadPoolExecutor(9) as pool:
        old = pool.submit(old_caller.call, Say(text="for the old caller", delay=3.0))
        wait_for(lambda: echo_in_flight(probe) == 1, what="the old call to reach echo")
        echo.kill("broker", signal.SIGKILL)
        echo.start_broker()
        wait_for(lambda: echo_in_flight(probe) == 0, timeout=15, what="echo to register again")
        new = [pool.submit(new_caller.call, Say(text=f"new {n}", delay=4.0)) for n in range(8)]
        answers = [call.result(timeout=20).text for call in new]
        assert old.exception(timeout=20) is not None  # lost with the old broker
    assert answers == [f"new {n}" for n in range(8)]


@pytest.mark.parametrize("depth", [950, 5000])  # decodable in the broker but not in a replay; not at all
def test_an_event_nested_too_deep_is_refused_and_the_history_still_replays(echo, depth):
    echo.identify("s1")
    agent = raw_dealer(echo, "agents")
    try:
        before = echo.client().call(BusEventsReplay(limit=0)).last_seq
        agent.send(wire.pack(wire.EVENT, b"agent.progress", b"\x91" * depth + b"\xc0"))
        header, body = next_reply(agent, "")
        assert header.error == "INVALID_ARGUMENT"
        assert "nested at most 100 deep" in wire.error_body.decode(body).message
    finally:
        agent.close(0)
    replayed = echo.client().call(BusEventsReplay(since=before))
    assert replayed.events == [] and replayed.last_seq == before


def test_a_request_nested_too_deep_is_invalid_not_an_internal_error(echo):
    agent = raw_dealer(echo)  # echo.say is no agent's to call: the operator's request, judged by echo
    try:
        say = msgspec.msgpack.encode(Say(text="x"))  # a fixmap: one more field, unknown and deep
        body = bytes([say[0] + 1]) + say[1:] + msgspec.msgpack.encode("junk") + b"\x91" * 5000 + b"\xc0"
        agent.send(wire.request("1", "echo.say", time.time() + 5, "", False, body))
        header, body = next_reply(agent, "1")
    finally:
        agent.close(0)
    assert header.error == "INVALID_ARGUMENT", wire.error_body.decode(body)
    assert "Traceback" not in echo.log("echo")
