"""The broker's side of the bus contract (issue 8): event bodies, deadlines, departures, cancels,
counters and bad input, against a real broker process over real sockets."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgspec
import pytest

from baaaht.bus import wire
from baaaht.bus.errors import BusError
from baaaht.bus.testing import next_event, wait_for
from baaaht.bus.testing.host import TEST_BUS
from baaaht.schemas.bus import BusEventsReplay, BusPing, BusServices, BusStats
from baaaht.schemas.errors import ErrorCode
from tests.conftest import ECHO_SERVICE
from tests.services.echo import Say
from tests.test_bus import next_reply, raw_dealer

CTL = str(Path(sys.executable).parent / "baaaht-ctl")
SLOW_HEARTBEATS = {"bus": {"heartbeat_interval": "1s"}}  # 3 s to notice a death by silence


def request(dealer, request_id: str, target: str, body: bytes, timeout: float = 5, stream=False) -> None:
    dealer.send(wire.request(request_id, target, time.time() + timeout, "", stream, body))


def test_an_event_body_that_is_not_msgpack_is_refused_and_never_replayed(echo):
    echo.identify("s1")
    agent = raw_dealer(echo, "agents")
    try:
        before = echo.client().call(BusEventsReplay(limit=0)).last_seq
        agent.send(wire.pack(wire.EVENT, b"agent.progress", b"\xc1 not msgpack"))
        header, body = next_reply(agent, "")  # an event has no id: refusals answer id ""
        assert header.error == "INVALID_ARGUMENT"
        error = wire.error_body.decode(body)
        assert "not one msgpack value" in error.message and error.details == {"topic": "agent.progress/s1"}
        with echo.client().subscribe(["agent.progress"]) as progress:
            agent.send(wire.pack(wire.EVENT, b"agent.progress", msgspec.msgpack.encode({"done": 1})))
            done = next_event(
                progress, lambda d: msgspec.msgpack.decode(d.body) == {"done": 1}, what="the good event"
            )
            assert done.seq == before + 1  # the refused one took no number
    finally:
        agent.close(0)
    replayed = echo.client().call(BusEventsReplay(since=before))
    assert [msgspec.msgpack.decode(e.body) for e in replayed.events] == [{"done": 1}]
    events = subprocess.run(
        [CTL, "--config", str(echo.config_path), "--json", "events"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert events.returncode == 0, events.stderr
    assert "Traceback" not in events.stderr


def test_a_deadline_is_answered_timeout_at_its_time_not_at_the_next_tick(make_host):
    host = make_host(SLOW_HEARTBEATS)
    mute = raw_dealer(host)  # a service that takes calls and never answers (nor checks deadlines)
    register = {"service": "mute", "instance": "m1", "methods": ["mute.wait"], "concurrency": 100}
    mute.send(wire.pack(wire.REGISTER, body=msgspec.msgpack.encode(register)))
    dealer = raw_dealer(host)
    try:
        host.wait_service_up("mute")
        took = []
        for n in range(3):  # wherever the deadline falls between two ticks
            started = time.monotonic()
            request(dealer, f"slow{n}", "mute.wait", b"\x80", timeout=0.25)
            header, _ = next_reply(dealer, f"slow{n}")
            took.append(time.monotonic() - started)
            assert header.error == "TIMEOUT"
        # the broker's tick is 1 s here: answered on it, some call would take well over half a second
        assert max(took) < 0.6, took
    finally:
        dealer.close(0)
        mute.close(0)


@pytest.mark.parametrize(
    "deadline, code",
    [(-1.0, "TIMEOUT"), (float("inf"), "INVALID_ARGUMENT"), (float("nan"), "INVALID_ARGUMENT")],
)
def test_builtin_methods_honour_deadlines(host, deadline, code):
    dealer = raw_dealer(host)
    try:
        at = time.time() + deadline if deadline == -1.0 else deadline
        dealer.send(wire.request("p", "bus.ping", at, "", False, b"\x80"))
        assert next_reply(dealer, "p")[0].error == code
    finally:
        dealer.close(0)


def test_a_killed_instance_with_a_healthy_replacement_fails_no_calls(make_host):
    host = make_host(SLOW_HEARTBEATS)
    host.start_service(ECHO_SERVICE, "echo")
    host.start_service(ECHO_SERVICE, "echo2", service="echo")
    client = host.client(timeout=5)
    client.call(Say(text="warm up"))  # one served each way: the next call goes to the first instance
    client.call(Say(text="warm up"))
    host.kill("echo", signal.SIGKILL)
    failed = []

    def caller():
        for _ in range(30):
            try:
                client.call(Say(text="x"))
            except BusError as exc:
                failed.append(exc.code)

    threads = [threading.Thread(target=caller) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert failed == []
    assert [len(s.instances) for s in client.call(BusServices(service="echo")).services] == [1]


def test_calls_in_flight_at_a_kill_are_answered_at_once_not_after_missed_heartbeats(make_host):
    host = make_host(SLOW_HEARTBEATS)
    host.start_service(ECHO_SERVICE, "echo")
    client = host.client(timeout=30)
    subscription = client.subscribe(["bus.service."])
    answered = []

    def slow_call():
        try:
            client.call(Say(text="x", delay=20), timeout=30)
        except BusError as exc:
            answered.append((exc.code, time.monotonic()))

    threads = [threading.Thread(target=slow_call) for _ in range(4)]
    for thread in threads:
        thread.start()
    wait_for(lambda: client.call(BusServices(service="echo")).services[0].instances[0].in_flight == 4)
    host.processes["echo"].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    for thread in threads:
        thread.join(10)
    assert [code for code, _ in answered] == [ErrorCode.UNAVAILABLE] * 4
    # missed heartbeats would take 3 s here; the connection's close is seen at once
    assert max(at for _, at in answered) - killed_at < 1.0
    down = subscription.next(timeout=5)
    assert down.topic == "bus.service.down" and down.event.reason == "disconnected"
    assert client.call(BusServices(service="echo")).services == []
    with pytest.raises(BusError) as caught:
        client.call(Say(text="x"))
    assert caught.value.code == ErrorCode.UNAVAILABLE
    subscription.close()
    host.processes.pop("echo").wait(10)


def test_pong_tells_the_heartbeat_rule(host):
    pong = host.client().call(BusPing())
    assert (pong.heartbeat_interval, pong.heartbeat_liveness) == (0.2, TEST_BUS["heartbeat_liveness"])


def test_a_caller_without_heartbeats_is_told_why_its_calls_end(host):
    host.start_service(ECHO_SERVICE, "echo")
    silent = raw_dealer(host)  # sends one request and never a heartbeat
    try:
        request(silent, "1", "echo.say", msgspec.msgpack.encode(Say(text="x", delay=10)), timeout=20)
        header, body = next_reply(silent, "1")
        assert header.error == "UNAVAILABLE" and "heartbeat" in wire.error_body.decode(body).message
    finally:
        silent.close(0)


def test_a_cancelled_stream_ends_with_a_cancelled_reply(echo):
    dealer = raw_dealer(echo)
    try:
        body = msgspec.msgpack.encode({"type": "echo.count", "to": 100000, "interval": 0.01})
        request(dealer, "s", "echo.count", body, timeout=30, stream=True)
        assert dealer.poll(5000)
        dealer.send(wire.pack(wire.CANCEL, body=b"s"))
        kinds = []
        while True:
            assert dealer.poll(5000), "no final reply after the cancel"
            envelope = dealer.recv()
            kind = wire.kind_of(envelope)
            if kind in (wire.REPLY, wire.PARTIAL):
                header = wire.reply_header.decode(wire.header_of(envelope))
                kinds.append((kind, header.error))
                if kind == wire.REPLY:
                    break
        assert kinds[-1] == (wire.REPLY, "CANCELLED")
        # and nothing more for that call, whatever the service still had on the way
        late = time.monotonic() + 0.5
        while dealer.poll(max(0, int((late - time.monotonic()) * 1000))):
            assert wire.kind_of(dealer.recv()) == wire.HEARTBEAT
    finally:
        dealer.close(0)
    assert "CANCELLED" not in echo.client().call(BusStats()).errors  # the caller's doing, not a fault


def test_operator_cli_runs_leave_no_errors_in_the_counters(echo):
    before = echo.client().call(BusStats()).errors  # the harness's start-up probes may have timed out
    for _ in range(20):
        # `services`, not `status`: status fails on a host without the container, session and policy services
        listed = subprocess.run(
            [CTL, "--config", str(echo.config_path), "services"], capture_output=True, text=True, timeout=30
        )
        assert listed.returncode == 0, listed.stderr
    # a departed ctl's heartbeat is never counted: wait until the broker has heartbeated a few times
    probe = echo.client()
    ticks = probe.call(BusStats()).messages_out
    wait_for(lambda: probe.call(BusStats()).messages_out > ticks + 10, what="10 broker messages out")
    assert probe.call(BusStats()).errors == before


def test_a_fuzzing_peer_costs_a_bounded_number_of_log_lines(host):
    dealer = raw_dealer(host)
    try:
        for n in range(10_000):
            dealer.send(b"junk" if n % 2 else wire.pack(wire.REQUEST, b"\xc1"))
        probe = host.client()
        wait_for(lambda: probe.call(BusStats()).malformed >= 10_000, what="every frame counted")
        wait_for(lambda: "more malformed messages" in host.log("broker"), what="the summary line")
    finally:
        dealer.close(0)
    stats = host.client().call(BusStats())
    assert stats.malformed_kinds == {"not_baaaht": 5000, "undecodable_request": 5000}
    lines = [json.loads(line) for line in host.log("broker").splitlines() if "malformed" in line]
    assert len(lines) <= 4, lines
    summary = next(line for line in lines if line["message"] == "more malformed messages")
    assert sum(summary["kinds"].values()) == summary["count"] and len(summary["peers"]) == 1


def test_a_broker_restart_announces_each_instance_once(make_host):
    # A restart shorter than the service's liveness: its queued heartbeats reach the new broker.
    echo = make_host(SLOW_HEARTBEATS)
    echo.start_service(ECHO_SERVICE, "echo")
    echo.kill("broker", signal.SIGKILL)
    time.sleep(2.0)  # down for two heartbeats, under the service's 3 s liveness (supervisord's backoff)
    echo.start_broker()
    client = echo.client()
    echo.wait_registered("echo", echo.processes["echo"].pid)
    # the window in which a second registration (heartbeat answered DISCONNECT, and reconnect) lands
    ticks = client.call(BusStats()).messages_out
    wait_for(lambda: client.call(BusStats()).messages_out > ticks + 20, what="20 broker messages out")
    ups = [e for e in client.call(BusEventsReplay(topics=["bus.service.up"])).events]
    instances = [msgspec.msgpack.decode(e.body)["instance"] for e in ups]
    assert len(instances) == len(set(instances)) == 1, instances
