"""Blocking callers that drive their connection themselves (bus/connection.py: who leads), against a
real broker: replies read on the caller's own thread, and everything the I/O thread did still done
when callers lead (ordering, many threads on one client, deadlines, close, heartbeats)."""

from __future__ import annotations

import queue
import threading
import time

import pytest

from baaaht.bus import wire
from baaaht.bus.client import BusClient, PendingCall
from baaaht.bus.connection import Connection
from baaaht.bus.errors import BusError
from baaaht.bus.testing import wait_for
from baaaht.schemas.bus import BusEventsReplay, BusPing, BusServices, Register
from baaaht.schemas.errors import ErrorCode
from tests.services.echo import Say, Shout


def delivering_threads(client, calls: int) -> list[int]:
    """The thread that handed over each reply of `calls` pings, made the way BusClient.call makes them."""
    threads: list[int] = []
    for _ in range(calls):
        replies: queue.SimpleQueue = queue.SimpleQueue()

        def deliver(reply, replies=replies) -> None:
            threads.append(threading.get_ident())
            replies.put(reply)

        call = client.connection.core.new_call("bus.ping", b"\x80", 5.0, "", False, deliver, time.monotonic())
        with PendingCall(client.connection, call, replies) as pending:
            assert pending.take(client.connection.wait_reply(call, replies))
    return threads


def in_flight(probe) -> int:
    return probe.call(BusServices(service="echo")).services[0].instances[0].in_flight


def test_a_blocking_caller_reads_its_own_reply_instead_of_waking_the_io_thread(host):
    client = host.client()
    client.call(BusPing())
    threads = delivering_threads(client, 20)
    # A caller that finds the I/O thread busy (a heartbeat) waits for it: most, not all, read their own.
    assert threads.count(threading.get_ident()) >= 15


def test_a_connection_whose_callers_may_not_lead_is_read_by_its_io_thread(host):
    client = host.client()
    client.connection.callers_lead = False  # as a service runner's connection
    client.call(BusPing())
    assert threading.get_ident() not in delivering_threads(client, 5)


def test_an_event_published_before_a_call_reaches_the_broker_before_it(host):
    registration = Register(service="echo", instance="echo-leading", methods=[])
    connection = Connection(
        host.endpoints.services, registration=lambda: wire.encode(registration), callers_lead=True
    )
    with BusClient(host.endpoints.services, connection=connection) as client:
        client.call(BusPing())  # after the REGISTER: it may publish echo.*
        for n in range(50):
            last = client.call(BusEventsReplay(limit=0)).last_seq
            client.publish(Shout(text=str(n)))
            # On the broker's one connection from this client: the event, then the replay request.
            replayed = client.call(BusEventsReplay(since=last, topics=["echo."])).events
            assert [e.topic for e in replayed] == ["echo.shouted"], n


def test_many_threads_on_one_client_each_get_their_own_replies(echo):
    client = echo.client(timeout=30)
    answers: dict[int, list[str]] = {}

    def caller(n: int) -> None:
        answers[n] = [client.call(Say(text=f"{n}.{k}")).text for k in range(100)]

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert answers == {n: [f"{n}.{k}" for k in range(100)] for n in range(12)}


def test_calls_on_a_client_are_answered_while_another_thread_waits_on_a_slow_one(echo):
    client = echo.client(timeout=30)
    slow: list[str] = []
    waiting = threading.Thread(target=lambda: slow.append(client.call(Say(text="slow", delay=2)).text))
    waiting.start()
    probe = echo.client()
    wait_for(lambda: in_flight(probe) == 1, what="the slow call to reach the service")
    started = time.monotonic()
    assert [client.call(Say(text=str(k))).text for k in range(20)] == [str(k) for k in range(20)]
    assert time.monotonic() - started < 1.5 and not slow
    waiting.join(10)
    assert slow == ["slow"]


def test_a_caller_that_gave_up_leaves_the_connection_to_the_next_call(echo):
    client = echo.client()
    with pytest.raises(BusError) as caught:
        client.call(Say(text="slow", delay=30), timeout=0.3)
    assert caught.value.code == ErrorCode.TIMEOUT
    started = time.monotonic()
    assert client.call(Say(text="next")).text == "next"
    assert time.monotonic() - started < 1


def test_closing_a_client_cancels_the_call_a_caller_waits_on_at_once(echo):
    client = echo.client(timeout=30)
    errors: list[BusError] = []

    def waiting() -> None:
        try:
            client.call(Say(text="slow", delay=20))
        except BusError as error:
            errors.append(error)

    thread = threading.Thread(target=waiting)
    thread.start()
    probe = echo.client()
    wait_for(lambda: in_flight(probe) == 1, what="the slow call to reach the service")
    started = time.monotonic()
    client.close()
    thread.join(5)
    assert [e.code for e in errors] == [ErrorCode.CANCELLED]
    assert time.monotonic() - started < 3


def test_an_idle_client_still_hears_the_broker(make_host):
    host = make_host({"bus": {"heartbeat_interval": "100ms", "heartbeat_liveness": 3}})
    client = host.client()
    client.call(BusPing())
    core = client.connection.core
    heard = core.last_heard
    # Nobody calls: the I/O thread comes back for each heartbeat, and reads the broker's.
    wait_for(lambda: core.last_heard > heard + 0.5, what="heartbeats to be read while idle", timeout=5)
    assert core.connected and client.call(BusPing())


def io_thread_use(client) -> tuple[float, int]:
    """(CPU seconds, voluntary context switches: its wake-ups) of the client's I/O thread so far."""
    thread = client.connection._thread
    with open(f"/proc/self/task/{thread.native_id}/status") as status:
        switches = next(int(line.split()[1]) for line in status if line.startswith("voluntary_ctxt_switches"))
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident)), switches


def test_the_io_thread_sleeps_while_its_caller_leads_and_while_the_client_is_idle(host):
    client = host.client()
    client.call(BusPing())
    cpu, wakeups = io_thread_use(client)
    for _ in range(200):
        client.call(BusPing())
    time.sleep(0.5)  # idle: heartbeats only
    # It wakes for heartbeats (and a call that finds it busy with one), never for each call or in a spin.
    cpu_after, wakeups_after = io_thread_use(client)
    assert wakeups_after - wakeups < 50 and cpu_after - cpu < 0.1


def test_a_reply_queued_behind_a_message_whose_signal_the_calls_send_took_is_read_at_once(silent_broker):
    _run_dir, endpoint, router = silent_broker
    # Heartbeats far apart: nobody but the caller reads the connection during the test.
    client = BusClient(endpoint, timeout=5, heartbeat_interval=30)
    answered: list[bytes] = []

    def call() -> None:
        answered.append(client.call_raw("kit.echo", b"\x80"))

    def answer() -> bytes:
        envelope = b""
        while wire.kind_of(envelope) != wire.REQUEST:  # the client's heartbeats aside
            assert router.poll(5000)
            route, envelope = router.recv_multipart()
        request = wire.request_header.decode(wire.header_of(envelope))
        router.send_multipart([route, wire.reply(wire.REPLY, request.id, b"\xc0")])
        return route

    try:
        first = threading.Thread(target=call)
        first.start()
        route = answer()
        first.join(5)
        wait_for(lambda: client.connection._leader is None, what="the connection to be free")
        # A message nobody reads: its FD signal is pending when the next call's send takes it.
        router.send_multipart([route, wire.pack(wire.HEARTBEAT)])
        time.sleep(0.2)  # on its way into the client's queue (no event to wait on there)
        started = time.monotonic()
        second = threading.Thread(target=call)
        second.start()
        answer()
        second.join(5)
        # Behind the unread heartbeat the reply brings no new signal: only a look before sleeping finds it.
        assert answered == [b"\xc0", b"\xc0"] and time.monotonic() - started < 2
    finally:
        client.close()
