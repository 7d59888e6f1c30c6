"""The bus end to end: a real broker process, real service processes, real sockets."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
import time

import msgspec
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from baaaht.bus import wire
from baaaht.bus.client import BusClient
from baaaht.bus.errors import BusError
from baaaht.bus.runner import ServiceRunner
from baaaht.bus.service import Service
from baaaht.bus.testing import wait_for
from baaaht.common.endpoints import Endpoints
from baaaht.schemas.bus import BusEventsReplay, BusPeers, BusPing, BusServices, BusStats
from baaaht.schemas.errors import ErrorCode
from tests.conftest import ECHO_SERVICE
from tests.services.echo import Count, EchoService, Emit, Fail, Say, SeenQuery, Shout


def test_request_reply_carries_the_callers_identity(echo):
    client = echo.client()
    said = client.call(Say(text="hello"))
    assert said.text == "hello"
    assert said.caller_socket == "services"
    assert said.caller_uid == os.getuid()  # from the kernel, not from anything the client wrote


def test_errors_cross_the_wire_with_code_and_details(echo):
    client = echo.client()
    with pytest.raises(BusError) as caught:
        client.call(Fail(code="FAILED_PRECONDITION"))
    assert caught.value.code == ErrorCode.FAILED_PRECONDITION
    assert caught.value.details == {"asked": "FAILED_PRECONDITION"}
    with pytest.raises(BusError) as caught:
        client.call(Fail())
    assert caught.value.code == ErrorCode.INTERNAL and "RuntimeError: boom" in caught.value.message
    assert client.call(Say(text="still serving")).text == "still serving"


def test_invalid_body_names_the_field(echo):
    client = echo.client()
    with pytest.raises(BusError) as caught:
        client.call_raw("echo.say", msgspec.msgpack.encode({"text": 42}))
    assert caught.value.code == ErrorCode.INVALID_ARGUMENT
    assert caught.value.details == {"path": "$.text"}


def test_builtin_methods_validate_their_bodies_too(host):
    with pytest.raises(BusError) as caught:
        host.client().call_raw("bus.events.replay", msgspec.msgpack.encode({"since": "yesterday"}))
    assert caught.value.code == ErrorCode.INVALID_ARGUMENT
    assert caught.value.details == {"path": "$.since"}
    with pytest.raises(BusError) as caught:
        host.client().call_raw("bus.nosuch", b"\x80")
    assert caught.value.code == ErrorCode.NOT_FOUND


def test_unknown_service_and_method(echo):
    client = echo.client()
    with pytest.raises(BusError) as caught:
        client.call_raw("nosuch.method", b"\x80")
    assert caught.value.code == ErrorCode.UNAVAILABLE
    with pytest.raises(BusError) as caught:
        client.call_raw("echo.nosuch", b"\x80")
    assert caught.value.code == ErrorCode.NOT_FOUND


def test_pool_spreads_load_over_instances(echo):
    second = echo.start_service(ECHO_SERVICE, "echo2", service="echo")
    client = echo.client()
    pids = []
    lock = threading.Lock()

    def caller():
        for _ in range(10):
            pid = client.call(Say(text="x", delay=0.02)).pid
            with lock:
                pids.append(pid)

    threads = [threading.Thread(target=caller) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(pids) == 80
    first = echo.processes["echo"].pid
    assert pids.count(first) >= 20 and pids.count(second.pid) >= 20


def test_deadline_expires_with_timeout_and_the_handler_is_cancelled(echo):
    client = echo.client()
    started = time.monotonic()
    with pytest.raises(BusError) as caught:
        client.call(Say(text="slow", delay=30), timeout=0.5)
    assert caught.value.code == ErrorCode.TIMEOUT
    assert time.monotonic() - started < 5
    # the handler saw the cancellation: the instance is free again
    wait_for(lambda: client.call(BusServices(service="echo")).services[0].instances[0].in_flight == 0)


def test_stream_and_cancellation(echo):
    client = echo.client()
    assert [t.n for t in client.stream(Count(to=5))] == [0, 1, 2, 3, 4]
    items = client.stream(Count(to=1000, interval=0.01))
    assert next(items).n == 0
    assert next(items).n == 1
    items.close()
    wait_for(
        lambda: client.call(SeenQuery()).cancelled_streams == 1, what="the handler to see the cancellation"
    )


def test_broker_restart_is_survived_without_restarting_anyone(echo):
    client = echo.client(timeout=2)
    assert client.call(Say(text="before")).text == "before"
    echo.kill("broker", signal.SIGKILL)
    echo.start_broker()
    wait_for(
        lambda: client.call(Say(text="after")).text == "after", timeout=15, what="echo back after restart"
    )
    assert echo.processes["echo"].poll() is None


def test_subscription_survives_a_broker_restart(echo):
    client = echo.client(timeout=2)
    subscription = client.subscribe(["echo."])
    client.call(Emit(text="before", times=3))
    assert [subscription.next(timeout=5).event.text for _ in range(3)] == ["before"] * 3
    echo.kill("broker", signal.SIGKILL)
    echo.start_broker()
    wait_for(lambda: client.call(Emit(text="after", times=2)) or True, timeout=15, what="echo to come back")
    # the new broker numbers from 1 again: nothing it publishes is mistaken for already seen
    assert [subscription.next(timeout=5).event.text for _ in range(2)] == ["after"] * 2
    subscription.close()
    # and the service's own @on_event handler follows the new broker too
    wait_for(lambda: "after" in client.call(SeenQuery()).topics, timeout=15, what="echo to see events again")


def test_an_event_made_before_the_event_follower_subscribed_reaches_its_handlers(host, monkeypatch):
    """The follower subscribes after the instance reports itself healthy; an event made in between (a
    user message that should start an assistant, sent as soon as the host is up) is replayed to it."""
    follower_may_start = threading.Event()
    follow = ServiceRunner._follow_events

    def late_follower(self, stopping):
        follower_may_start.wait(10)
        follow(self, stopping)

    monkeypatch.setattr(ServiceRunner, "_follow_events", late_follower)
    runner = ServiceRunner(EchoService, Endpoints.for_config(host.config.bus), heartbeat_interval=0.2)
    serving = threading.Thread(target=runner.run, args=(EchoService(events=runner.bus),), daemon=True)
    serving.start()
    try:
        client = host.client()
        wait_for(
            lambda: client.call(Say(text="up"), timeout=1).text == "up", timeout=10, what="echo to serve"
        )
        client.call(Emit(text="early"))  # the follower has not subscribed yet
        follower_may_start.set()
        wait_for(lambda: "early" in client.call(SeenQuery()).topics, timeout=10, what="echo's handler")
    finally:
        follower_may_start.set()
        runner.stop()
        serving.join(15)


def test_events_fan_out_and_replay_after_a_gap(echo):
    client = echo.client()
    subscription = client.subscribe(["echo."])
    client.call(Emit(text="one", times=3))
    got = [subscription.next(timeout=5) for _ in range(3)]
    assert [d.event for d in got] == [Shout(text="one")] * 3
    assert all(d.topic == "echo.shouted.loud" and d.source == "echo" for d in got)
    assert [d.seq for d in got] == sorted(d.seq for d in got)
    subscription.close()

    # A subscriber that was away: it asks for everything after the last seq it saw.
    last = got[-1].seq
    client.call(Emit(text="missed", times=5))
    with client.subscribe(["echo."], since=last) as late:
        replayed = [late.next(timeout=5) for _ in range(5)]
    assert [d.event.text for d in replayed] == ["missed"] * 5
    assert [d.seq for d in replayed] == list(range(last + 1, last + 6))
    # the service's own event handler saw them too
    wait_for(lambda: client.call(SeenQuery()).topics.count("missed") == 5)


def test_subscriber_sees_a_gap_and_fills_it(echo):
    client = echo.client()
    subscription = client.subscribe(["echo."])
    client.call(Emit(text="a"))
    first = subscription.next(timeout=5)
    subscription.order.last_seq = first.seq - 3  # pretend the PUB dropped two events before this one
    client.call(Emit(text="b"))
    replayed = subscription.next(timeout=5)
    live = subscription.next(timeout=5)
    assert subscription.gaps == 1
    # the matching event inside the gap comes back from the broker's history, in order, then the live one
    assert (replayed.seq, replayed.event.text) == (first.seq, "a")
    assert live.event.text == "b" and live.seq > first.seq
    subscription.close()


def test_replay_is_bounded_by_history(make_host):
    host = make_host({"bus": {"event_history": 3}})
    host.start_service(ECHO_SERVICE, "echo")
    client = host.client()
    client.call(Emit(text="x", times=10))
    wait_for(lambda: client.call(BusStats()).last_event_seq >= 10)
    result = client.call(BusEventsReplay(since=0))
    assert len(result.events) == 3
    assert result.first_seq == result.last_seq - 2


def test_socket_files_and_run_directory_are_private(host):
    endpoints = Endpoints.for_config(host.config.bus)
    for endpoint in (endpoints.services, endpoints.events, endpoints.agents):
        mode = os.stat(endpoint[len("ipc://") :]).st_mode
        assert stat.S_IMODE(mode) == 0o660
    assert stat.S_IMODE(os.stat(endpoints.run_dir).st_mode) == 0o750
    assert stat.S_IMODE(os.stat(endpoints.agent_dir).st_mode) == 0o750


def test_agents_cannot_register_and_call_only_what_their_role_may(echo):
    endpoints = Endpoints.for_config(echo.config.bus)
    identity = echo.identify("s1")
    agent = echo.agent_client()
    caller = agent.call(BusPing()).caller
    assert (caller.role, caller.session, caller.container) == ("agent", "s1", identity.container_id)
    with pytest.raises(BusError) as caught:
        agent.call(Say(text="from an agent"))
    assert caught.value.code == ErrorCode.PERMISSION_DENIED
    assert caught.value.message.startswith("agent peers may not call 'echo.say'")
    dealer = raw_dealer(echo, "agents")
    try:
        body = msgspec.msgpack.encode({"service": "session", "instance": "evil", "methods": ["session.get"]})
        dealer.send(wire.pack(wire.REGISTER, body=body))
        assert dealer.poll(5000)
        envelope = dealer.recv()
        assert wire.kind_of(envelope) == wire.DISCONNECT
        assert wire.error_body.decode(wire.split(envelope)[1]).code == ErrorCode.PERMISSION_DENIED
    finally:
        dealer.close(0)
    peers = echo.client().call(BusPeers()).peers
    assert any(p.socket == "agents" and p.pid == os.getpid() and p.role == "agent" for p in peers)
    assert "session" not in {s.name for s in echo.client().call(BusServices()).services}
    assert endpoints.agents == agent.endpoint


def raw_dealer(host, socket: str = "services", routing_id: bytes = b"") -> zmq.Socket:
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    if routing_id:
        dealer.setsockopt(zmq.ROUTING_ID, routing_id)
    dealer.connect(getattr(Endpoints.for_config(host.config.bus), socket))
    return dealer


def raw_service(host, service: str) -> zmq.Socket:
    """A DEALER registered as `service` (no methods): it may publish that service's topics."""
    dealer = raw_dealer(host)
    register = {"service": service, "instance": f"raw-{service}", "methods": []}
    dealer.send(wire.pack(wire.REGISTER, body=msgspec.msgpack.encode(register)))
    dealer.send(wire.request("registered", "bus.ping", time.time() + 5, "", False, b"\x80"))
    next_reply(dealer, "registered")  # after the REGISTER: the broker has it
    return dealer


def next_reply(dealer: zmq.Socket, request_id: str) -> tuple[wire.ReplyHeader, bytes]:
    """The reply with this id, skipping the broker's heartbeats."""
    while True:
        assert dealer.poll(5000), f"no reply {request_id!r}"
        envelope = dealer.recv()
        if wire.kind_of(envelope) == wire.REPLY:
            header_bytes, body = wire.split(envelope)
            header = wire.reply_header.decode(header_bytes)
            if header.id == request_id:
                return header, body


def test_an_agent_cannot_answer_calls_it_was_not_given(echo):
    operator = echo.client(timeout=10)
    echo.identify("s1")
    agent = raw_dealer(echo, "agents")
    try:
        said = operator.call(Say(text="learn a token", delay=0))
        assert said.text == "learn a token"
        results = []
        thread = threading.Thread(
            target=lambda: results.append(operator.call(Say(text="genuine", delay=0.5)))
        )
        thread.start()
        wait_for(lambda: operator.call(BusServices(service="echo")).services[0].instances[0].in_flight == 1)
        # An agent guesses every plausible token and request id: none of its replies is delivered.
        for token in range(1, 64):
            forged = wire.reply(
                wire.REPLY,
                format(token, "x"),
                msgspec.msgpack.encode({"text": "FORGED"}),
                token=token.to_bytes(wire.TOKEN_SIZE, "big"),
            )
            agent.send(forged)
        header, body = next_reply(agent, "")
        refusal = wire.error_body.decode(body).message
        assert header.error == "PERMISSION_DENIED" and "agent peers may not answer" in refusal
        thread.join(10)
        assert results[0].text == "genuine"
    finally:
        agent.close(0)


def test_agents_publish_only_agent_topics_in_their_session_and_see_no_host_state(echo):
    identity = echo.identify("s1")
    agent = raw_dealer(echo, "agents")
    operator = echo.client()
    try:
        subscription = operator.subscribe(["echo.", "agent."])
        agent.send(
            wire.pack(
                wire.EVENT, b"echo.shouted", msgspec.msgpack.encode({"type": "echo.shouted", "text": "x"})
            )
        )
        header, body = next_reply(agent, "")
        assert header.error == "PERMISSION_DENIED" and b"agent." in body
        agent.send(wire.pack(wire.EVENT, b"agent.progress", msgspec.msgpack.encode({"done": 1})))
        delivery = subscription.next(timeout=5)
        assert delivery.topic == "agent.progress/s1"  # its own session's, whatever it named
        assert delivery.source == f"agent:{identity.container_id}"
        subscription.close()
        for target in ("bus.peers", "bus.services", "bus.stats", "bus.agents.list", "bus.agents.update"):
            agent.send(wire.request(target, target, time.time() + 5, "", False, b"\x80"))
            header, _ = next_reply(agent, target)
            assert header.error == "PERMISSION_DENIED", target
        agent.send(wire.request("ping", "bus.ping", time.time() + 5, "", False, b"\x80"))
        assert next_reply(agent, "ping")[0].error == ""
        agent.send(wire.request("replay", "bus.events.replay", time.time() + 5, "", False, b"\x80"))
        header, body = next_reply(agent, "replay")
        # Its own session's events only: not bus.started, bus.service.up, echo's or other sessions'.
        assert [event[2] for event in msgspec.msgpack.decode(body)["events"]] == ["agent.progress/s1"]
    finally:
        agent.close(0)


def test_oversized_events_are_refused(make_host):
    host = make_host({"bus": {"max_event_size": "1KiB"}})
    dealer = raw_service(host, "echo")
    try:
        dealer.send(wire.pack(wire.EVENT, b"echo.big", b"x" * 2048))
        header, body = next_reply(dealer, "")
        assert header.error == "RESOURCE_EXHAUSTED"
    finally:
        dealer.close(0)
    assert host.client().call(BusEventsReplay(topics=["echo."])).events == []


AGENT_PING = """
import sys, time, msgspec, zmq
from baaaht.bus import wire
dealer = zmq.Context.instance().socket(zmq.DEALER)
dealer.setsockopt(zmq.ROUTING_ID, b"chosen-id")
dealer.connect(sys.argv[1])
dealer.send(wire.request("p", "bus.ping", time.time() + 5, "", False, b"\\x80"))
while True:
    assert dealer.poll(5000)
    envelope = dealer.recv()
    if wire.kind_of(envelope) == wire.REPLY:
        print(msgspec.msgpack.decode(wire.split(envelope)[1])["caller"]["pid"])
        break
dealer.close(0)
"""


def test_an_agent_reusing_a_departed_agents_routing_id_is_seen_as_itself(host):
    agents = Endpoints.for_config(host.config.bus).agents
    for _ in range(2):  # the second process connects with the first one's routing id, within its liveness
        with subprocess.Popen(
            [sys.executable, "-c", AGENT_PING, agents],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ) as agent:
            out, err = agent.communicate(timeout=30)
            assert agent.returncode == 0, err
            assert int(out) == agent.pid  # its own kernel credentials, not the departed process's


frames_strategy = st.lists(st.binary(max_size=64), min_size=0, max_size=6)
kinds = st.sampled_from([*wire.KIND_NAMES, wire.PROTOCOL + b"\x99", wire.PROTOCOL, b""])
header_sizes = st.integers(min_value=0, max_value=0xFFFF).map(lambda n: n.to_bytes(2, "big"))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    garbage=st.one_of(
        frames_strategy,
        # envelopes with a known kind, any header length and any bytes, maybe with extra frames
        st.tuples(kinds, header_sizes, st.binary(max_size=64), frames_strategy).map(
            lambda t: [t[0] + t[1] + t[2], *t[3]]
        ),
    )
)
def test_malformed_frames_never_hurt_the_broker(host, garbage):
    dealer = raw_dealer(host)
    try:
        if garbage:
            dealer.send_multipart(garbage)
        dealer.send(wire.request("probe", "bus.ping", time.time() + 5, "", False, b"\x80"))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            assert dealer.poll(5000), "the broker stopped answering"
            envelope = dealer.recv_multipart()[0]
            if (
                wire.kind_of(envelope) == wire.REPLY
                and wire.reply_header.decode(wire.header_of(envelope)).id == "probe"
            ):
                break
        else:
            pytest.fail("no answer to the probe")
    finally:
        dealer.close(0)


def test_malformed_frames_are_counted_and_answered(host):
    dealer = raw_dealer(host)
    try:
        dealer.send_multipart([b"junk"])
        assert dealer.poll(5000)
        header, body = wire.split(dealer.recv())
        assert wire.reply_header.decode(header).error == "INVALID_ARGUMENT"
        dealer.send(wire.pack(wire.REQUEST, b"\xc1not msgpack"))
        assert dealer.poll(5000)
        assert "undecodable" in wire.error_body.decode(wire.split(dealer.recv())[1]).message
    finally:
        dealer.close(0)
    stats = host.client().call(BusStats())
    assert stats.malformed >= 2 and stats.errors["INVALID_ARGUMENT"] >= 2


def test_stats_and_services_views(echo):
    client = echo.client()
    for _ in range(5):
        client.call(Say(text="x"))
    with pytest.raises(BusError):
        client.call(Fail(code="NOT_FOUND"))
    stats = client.call(BusStats())
    assert stats.per_service["echo"].requests >= 6
    assert stats.per_service["echo"].errors == {"NOT_FOUND": 1}
    instance = client.call(BusServices(service="echo")).services[0].instances[0]
    assert instance.served >= 6 and "echo.say" in instance.methods and instance.healthy


def test_sigterm_drains_in_flight_work(echo):
    client = echo.client(timeout=10)
    results = []
    thread = threading.Thread(target=lambda: results.append(client.call(Say(text="finish me", delay=0.5))))
    thread.start()
    wait_for(lambda: client.call(BusServices(service="echo")).services[0].instances[0].in_flight == 1)
    process = echo.processes["echo"]
    process.send_signal(signal.SIGTERM)
    thread.join(10)
    assert results and results[0].text == "finish me"
    assert process.wait(10) == 0
    wait_for(lambda: not client.call(BusServices(service="echo")).services, what="the instance to unregister")


def test_events_published_in_order_from_many_threads_arrive_in_that_order(host):
    client = host.service_client("echo")
    subscription = client.subscribe(["echo."])
    lock = threading.Lock()
    counter = iter(range(400))

    def publisher():
        for _ in range(100):
            with lock:  # the order the publishers agree on
                client.publish(Shout(text=str(next(counter))))

    threads = [threading.Thread(target=publisher) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    received = [int(subscription.next(timeout=5).event.text) for _ in range(400)]
    subscription.close()
    assert received == list(range(400))


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_tcp_is_off_by_default_and_loopback_when_on(make_host):
    host = make_host()
    assert not Endpoints.for_config(host.config.bus).tcp_services
    port = free_port()
    tcp_host = make_host({"bus": {"tcp_enabled": True, "tcp_port": port}})
    endpoints = Endpoints.for_config(tcp_host.config.bus)
    assert endpoints.tcp_services == f"tcp://127.0.0.1:{port}"
    client = BusClient(endpoints.tcp_services, timeout=5)
    try:  # no NULL on tcp:// (tests/test_curve.py has the peers with keys)
        with pytest.raises(BusError) as caught:
            client.call(BusPing())
        assert caught.value.code == ErrorCode.UNAUTHENTICATED
    finally:
        client.close()


def test_next_returns_none_after_its_timeout_even_while_heartbeats_flow(host):
    with host.client().subscribe(["nothing."]) as subscription:
        started = time.monotonic()
        assert subscription.next(timeout=1.0) is None  # broker heartbeats arrive every 200 ms meanwhile
        assert time.monotonic() - started < 5


class Impostor(Service):
    name = "bus"  # the broker's own namespace: refused


def test_a_refused_registration_ends_the_service_with_an_error(host):
    runner = ServiceRunner(Impostor, Endpoints.for_config(host.config.bus), heartbeat_interval=0.2)
    with pytest.raises(SystemExit) as caught:
        runner.run(Impostor())
    assert "registration refused" in str(caught.value) and "invalid service name 'bus'" in str(caught.value)
