"""Fairness mechanisms as pure logic, time passed in: token buckets, the fair queue, per-session
quotas, the broker's in-flight caps and event quotas, and the agents' own event history budget."""

import threading

import msgspec
import pytest

from baaaht.bus.errors import BusError
from baaaht.bus.fair import FairQueue
from baaaht.bus.registry import (
    AGENTS_SOCKET,
    REPLAY_SCAN_BYTES,
    SERVICES_SOCKET,
    EventLog,
    Held,
    Registry,
    ReplayPage,
)
from baaaht.bus.runner import caller_key
from baaaht.bus.testing import wait_for
from baaaht.common.rate import TokenBucket
from baaaht.common.session_quotas import SessionQuotas
from baaaht.schemas.bus import Caller, Register
from baaaht.schemas.config import LimitsConfig, Size
from baaaht.schemas.errors import ErrorCode
from tests.test_registry import connection

# -- token buckets --------------------------------------------------------------------------------


def test_a_bucket_bursts_then_refills_at_its_rate_and_a_refusal_costs_nothing():
    bucket = TokenBucket(rate=2.0, burst=3)
    assert [bucket.take(1, now=0.0) for _ in range(4)] == [True, True, True, False]
    assert not bucket.take(1, now=0.4)  # 0.8 of a token so far
    assert bucket.take(1, now=0.5) and not bucket.take(1, now=0.5)
    assert bucket.take(3, now=100.0) and not bucket.full(100.0)  # never holds more than its burst
    assert not bucket.take(2, now=100.5) and bucket.take(1, now=100.5)  # the refused 2 took nothing
    assert bucket.full(102.0)


def test_a_charge_past_what_a_bucket_holds_is_a_debt_the_refill_pays_off_first():
    bucket = TokenBucket(rate=10.0, burst=100)
    bucket.charge(150, now=0.0)
    assert bucket.available(0.0) == -50
    assert not bucket.take(1, now=4.0) and bucket.available(4.0) == -10
    assert bucket.available(6.0) == 10 and bucket.take(10, now=6.0)


def test_a_clock_going_back_never_adds_tokens():
    bucket = TokenBucket(rate=1.0, burst=1)
    assert bucket.take(1, now=10.0)
    assert not bucket.take(1, now=5.0) and not bucket.take(1, now=10.5)
    assert bucket.take(1, now=11.0)


# -- the fair queue -------------------------------------------------------------------------------

ANY = 100  # a running share no test reaches


def take_all(queue: FairQueue, count: int) -> list:
    """`count` items, each finished at once (its caller's share freed)."""
    taken = []
    for _ in range(count):
        caller, item = queue.take(timeout=0)
        queue.done(caller)
        taken.append(item)
    return taken


def test_the_fair_queue_takes_callers_in_turn_not_in_arrival_order():
    queue = FairQueue(per_caller=100)
    for n in range(50):
        queue.put("flooder", f"f{n}", ANY)
    queue.put("quiet", "q0", ANY)
    queue.put("other", "o0", ANY)
    queue.put("quiet", "q1", ANY)
    assert take_all(queue, 6) == ["f0", "q0", "o0", "f1", "q1", "f2"]
    assert len(queue) == 47 and queue.queued("flooder") == 47 and queue.queued("quiet") == 0


def test_a_caller_gets_its_next_turn_after_every_other_waiting_caller():
    queue = FairQueue(per_caller=10)
    queue.put("a", 1, ANY)
    assert take_all(queue, 1) == [1]
    queue.put("b", 1, ANY)
    queue.put("a", 2, ANY)  # a comes back after b arrived: b goes first
    queue.put("b", 2, ANY)
    assert take_all(queue, 3) == [1, 2, 2]
    assert queue.take(timeout=0) is None


def test_the_fair_queue_bounds_each_callers_backlog_alone():
    queue = FairQueue(per_caller=2)
    assert queue.put("a", 1, ANY) and queue.put("a", 2, ANY) and not queue.put("a", 3, ANY)
    assert queue.put("b", 1, ANY)
    take_all(queue, 1)
    assert queue.put("a", 3, ANY)
    assert len(queue) == 3


def test_a_caller_at_its_running_share_is_passed_over_until_one_of_its_calls_is_done():
    queue = FairQueue(per_caller=10)
    for n in range(3):
        queue.put("agent", f"a{n}", 2)
    assert queue.take(timeout=0) == ("agent", "a0")
    assert queue.take(timeout=0) == ("agent", "a1")
    assert queue.take(timeout=0) is None  # a2 waits: two of its calls run
    queue.put("operator", "o0", ANY)
    assert queue.take(timeout=0) == ("operator", "o0")
    queue.done("agent")
    assert queue.take(timeout=0) == ("agent", "a2")


def test_a_call_started_at_once_counts_against_its_callers_share_and_never_passes_its_backlog():
    queue = FairQueue(per_caller=10)
    assert queue.start_now("agent", 2) and queue.start_now("agent", 2)
    assert not queue.start_now("agent", 2)  # both shares held by calls started at once
    queue.put("agent", "a0", 2)
    assert queue.take(timeout=0) is None  # a queued call waits for the share too
    queue.done("agent")
    assert not queue.start_now("agent", 2)  # below its share, but a0 waits: it goes first
    assert queue.take(timeout=0) == ("agent", "a0")
    queue.done("agent")
    queue.done("agent")
    assert queue.start_now("agent", 0)  # a share below 1 counts as 1
    queue.done("agent")
    queue.close()
    assert not queue.start_now("other", ANY)  # closed: nothing starts


def test_a_waiting_handler_wakes_for_a_put_and_for_close():
    queue = FairQueue(per_caller=10)
    taken = []
    handler = threading.Thread(target=lambda: taken.extend([queue.take(), queue.take()]))
    handler.start()
    queue.put("a", 1, ANY)
    wait_for(lambda: taken == [] and queue.queued("a") == 0, what="the handler to take the call")
    queue.put("a", 2, ANY)  # its share (100) is not reached: taken though 1 is not done
    handler.join(5)
    assert taken == [("a", 1), ("a", 2)]
    closer = threading.Thread(target=lambda: taken.append(queue.take()))
    closer.start()
    queue.put("b", 1, 0)  # a share below 1 counts as 1
    queue.close()
    closer.join(5)
    assert not closer.is_alive() and taken[-1] in (None, ("b", 1))
    assert queue.take() is None  # closed: nothing more is handed out


def test_a_burst_of_calls_is_all_taken_though_idle_handlers_are_woken_one_at_a_time():
    """A put wakes a handler only when none is on its way; each taker wakes the next while calls
    remain, so a taker that then blocks (a long call) strands none of the others' calls."""
    queue = FairQueue(per_caller=100)
    release = threading.Event()
    taken: list[int] = []
    lock = threading.Lock()

    def handler() -> None:
        while (item := queue.take()) is not None:
            caller, number = item
            with lock:
                taken.append(number)
            if number == 0:
                release.wait(30)  # the first call blocks its thread
            queue.done(caller)

    handlers = [threading.Thread(target=handler, daemon=True) for _ in range(4)]
    for thread in handlers:
        thread.start()
    try:
        wait_for(lambda: queue._idle == 4, what="four idle handlers")
        for number in range(8):
            queue.put(f"caller {number}", number, 1)
        wait_for(
            lambda: len(taken) == 8, timeout=5, what="every call taken while the first blocks its handler"
        )
        release.set()
        queue.put("late", 8, 1)  # after the burst: still taken
        wait_for(lambda: len(taken) == 9, what="the call after the burst")
    finally:
        release.set()
        queue.close()
        for thread in handlers:
            thread.join(5)
    assert sorted(taken) == list(range(9))


def test_callers_are_their_container_or_else_their_connection():
    in_container = Caller(socket="agents", peer="p1", container="c" * 64)
    assert caller_key(in_container) == caller_key(Caller(socket="agents", peer="p2", container="c" * 64))
    assert caller_key(Caller(socket="agents", peer="p1")) != caller_key(Caller(socket="services", peer="p1"))


# -- per-session quotas ---------------------------------------------------------------------------


ONE = {"messages": 1}


def test_each_session_has_its_own_quota_per_minute():
    quotas = SessionQuotas.for_limits(LimitsConfig(session_messages_per_minute=2))
    assert quotas.refusal("s1", ONE, 0.0) is None and quotas.refusal("s1", ONE, 0.0) is None
    refusal = quotas.refusal("s1", ONE, 1.0)
    assert refusal is not None and refusal.kind == "messages"
    assert refusal.message == (
        "session s1 has had its 2 messages a minute (limits.session_messages_per_minute):"
        " try again in 29.0s (this asks for 1)"
    )
    assert quotas.refusal("s2", ONE, 1.0) is None
    assert quotas.refusal("s1", ONE, 30.0) is None  # 2 a minute: one more each 30 s


def test_a_refused_call_takes_none_of_its_kinds():
    # A message refused for its count had already spent its bytes: each refused retry of a 1 MiB
    # message used an eighth of the session's minute.
    limits = LimitsConfig(session_messages_per_minute=2, session_message_bytes_per_minute=Size(1000))
    quotas = SessionQuotas.for_limits(limits)
    message = {"message_bytes": 400, "messages": 1}
    assert quotas.refusal("s", message, 0.0) is None and quotas.refusal("s", message, 0.0) is None
    for _ in range(3):
        refused = quotas.refusal("s", {"message_bytes": 100, "messages": 1}, 0.0)
        assert refused is not None and refused.kind == "messages"
    assert quotas.buckets[("s", "message_bytes")].available(0.0) == 200
    refused = quotas.refusal("s", {"messages": 1, "message_bytes": 800}, 30.0)  # a message back: 700 bytes
    assert refused is not None and refused.kind == "message_bytes" and "bytes of messages" in refused.message
    assert quotas.buckets[("s", "messages")].available(30.0) == 1


def test_an_amount_past_a_whole_minute_of_its_quota_is_named_in_its_unit():
    quotas = SessionQuotas.for_limits(LimitsConfig(session_tasks_per_minute=600))
    assert quotas.oversized("tasks", 600) is None
    assert quotas.oversized("tasks", 601) == (
        "601 task attempts at once are more than limits.session_tasks_per_minute allows in a minute (600)"
    )


def test_session_quotas_are_forgotten_once_full_again():
    quotas = SessionQuotas.for_limits(LimitsConfig(session_messages_per_minute=2))
    quotas.refusal("s1", ONE, 0.0)
    quotas.refusal("s2", ONE, 50.0)
    quotas.prune(60.0)
    assert list(quotas.buckets) == [("s2", "messages")]
    assert quotas.refusal("s2", ONE, 60.0) is None  # what it had taken is still counted
    assert quotas.refusal("s2", ONE, 60.0) is not None


# -- the broker's in-flight caps ------------------------------------------------------------------


def registry_with(**limits) -> Registry:
    registry = Registry(1.0, 3, msgspec.msgpack.encode, limits=LimitsConfig(**limits))
    service = registry.touch((0, b"svc"), SERVICES_SOCKET, connection(), 0.0)
    registry.register(service, Register(service="echo", instance="i", methods=["echo.say"], concurrency=4))
    return registry


def peer(registry, ident: bytes, socket: str, container: str = ""):
    index = 0 if socket == SERVICES_SOCKET else 1
    touched = registry.touch(
        (index, ident), socket, connection(index, role="agent" if index else "operator"), 0.0
    )
    if container:
        touched.caller = msgspec.structs.replace(touched.caller, container=container)
    return touched


def test_a_peer_past_its_in_flight_cap_is_refused_naming_the_cap_and_others_are_not():
    registry = registry_with(agent_in_flight=2, host_in_flight=3)
    agent, other = peer(registry, b"a", AGENTS_SOCKET), peer(registry, b"b", AGENTS_SOCKET)
    first = registry.route(agent, "1", "echo.say", 10, 0)
    registry.route(agent, "2", "echo.say", 10, 0)
    with pytest.raises(BusError) as caught:
        registry.route(agent, "3", "echo.say", 10, 0)
    assert caught.value.code is ErrorCode.RESOURCE_EXHAUSTED
    assert "limits.agent_in_flight is 2" in caught.value.message
    assert caught.value.details == {"limit": 2, "in_flight": 2}
    assert len(registry.in_flight) == 2  # the refused one was never recorded
    registry.route(other, "1", "echo.say", 10, 0)
    registry.complete(first.instance.peer, first.token, final=True)  # an answer frees a place
    registry.route(agent, "3", "echo.say", 10, 0)
    operator = peer(registry, b"op", SERVICES_SOCKET)
    for n in range(3):
        registry.route(operator, str(n), "echo.say", 10, 0)
    with pytest.raises(BusError) as caught:
        registry.route(operator, "4", "echo.say", 10, 0)
    assert "limits.host_in_flight is 3" in caught.value.message


def test_every_way_a_request_ends_gives_its_place_and_its_bytes_back():
    registry = registry_with(agent_in_flight=5, agent_bytes_in_flight=Size(500))
    agent = peer(registry, b"a", AGENTS_SOCKET)
    answered = registry.route(agent, "answered", "echo.say", 10, 0, size=100)
    registry.route(agent, "cancelled", "echo.say", 10, 0, size=100)
    registry.route(agent, "timed out", "echo.say", 1, 0, size=100)
    withdrawn = registry.route(agent, "withdrawn", "echo.say", 10, 0, size=100)
    assert registry.caps.of(agent) == Held(requests=4, bytes=400)
    registry.complete(answered.instance.peer, answered.token, final=True)
    assert registry.caps.of(agent) == Held(requests=3, bytes=300)
    registry.cancel(agent.key, "cancelled")
    assert registry.caps.of(agent) == Held(requests=2, bytes=200)
    registry.expire_deadlines(now=2)
    assert registry.caps.of(agent) == Held(requests=1, bytes=100)
    registry.withdraw(withdrawn.token)
    assert registry.caps.of(agent) == Held() and registry.caps.held == {}
    registry.route(agent, "abandoned", "echo.say", 10, 0, size=500)
    registry.drop_peer(agent.key, "gone")
    assert registry.caps.held == {}
    agent = peer(registry, b"a", AGENTS_SOCKET)
    served = registry.route(agent, "served by a gone instance", "echo.say", 10, 0, size=500)
    registry.drop_instance(served.instance.peer, "missed its heartbeats")
    assert registry.caps.held == {}


def test_an_agent_past_its_byte_budget_is_refused_naming_the_limit_its_bytes_and_the_size():
    registry = registry_with(agent_bytes_in_flight=Size(100))
    agent, other = peer(registry, b"a", AGENTS_SOCKET), peer(registry, b"b", AGENTS_SOCKET)
    registry.route(agent, "1", "echo.say", 10, 0, size=60)
    with pytest.raises(BusError) as caught:
        registry.route(agent, "2", "echo.say", 10, 0, size=50)
    assert caught.value.code is ErrorCode.RESOURCE_EXHAUSTED
    assert caught.value.message == (
        "echo.say refused: this caller has 60 bytes in flight and this request is 50 bytes, the limit"
        " limits.agent_bytes_in_flight is 100 bytes: wait for answers before sending more"
    )
    assert caught.value.details == {"limit": 100, "bytes_in_flight": 60, "size": 50}
    assert registry.caps.of(agent) == Held(requests=1, bytes=60)  # the refused one was never counted
    registry.route(agent, "2", "echo.say", 10, 0, size=40)  # exactly the budget
    registry.route(agent, "3", "echo.say", 10, 0, size=0)
    registry.route(other, "1", "echo.say", 10, 0, size=100)  # each agent has its own
    operator = peer(registry, b"op", SERVICES_SOCKET)
    registry.route(operator, "1", "echo.say", 10, 0, size=10**9)  # host peers have no byte budget


def test_an_agent_containers_connections_share_one_byte_budget():
    registry = registry_with(agent_bytes_in_flight=Size(100))
    container = "c" * 64
    one, two = peer(registry, b"a", AGENTS_SOCKET, container), peer(registry, b"b", AGENTS_SOCKET, container)
    first = registry.route(one, "1", "echo.say", 10, 0, size=70)
    with pytest.raises(BusError) as caught:
        registry.route(two, "1", "echo.say", 10, 0, size=70)
    assert caught.value.details == {"limit": 100, "bytes_in_flight": 70, "size": 70}
    registry.drop_peer(one.key, "gone")  # its connection's request is released with it
    assert registry.caps.held == {}
    registry.route(two, "1", "echo.say", 10, 0, size=100)
    assert first.token not in registry.in_flight


def test_an_agent_containers_connections_share_one_cap():
    registry = registry_with(agent_in_flight=2)
    container = "c" * 64
    one, two = peer(registry, b"a", AGENTS_SOCKET, container), peer(registry, b"b", AGENTS_SOCKET, container)
    registry.route(one, "1", "echo.say", 10, 0)
    registry.route(two, "1", "echo.say", 10, 0)
    with pytest.raises(BusError):
        registry.route(two, "2", "echo.say", 10, 0)


# -- agents' event quotas -------------------------------------------------------------------------


def test_an_agent_publishes_within_its_event_rate_and_byte_quotas():
    registry = registry_with(
        agent_events_per_second=10.0,
        agent_event_burst=3,
        agent_event_bytes_per_second=Size(100),
        agent_event_burst_bytes=Size(250),
    )
    quotas = registry.event_quotas
    agent, other = peer(registry, b"a", AGENTS_SOCKET), peer(registry, b"b", AGENTS_SOCKET)
    assert [quotas.refusal(agent, 10, 0.0) for _ in range(3)] == [None, None, None]
    refusal = quotas.refusal(agent, 10, 0.0)
    assert "limits.agent_events_per_second" in refusal
    assert quotas.refusal(other, 10, 0.0) is None
    assert quotas.refusal(agent, 10, 0.1) is None  # one event a tenth of a second
    assert quotas.refusal(other, 200, 0.1) is None
    refusal = quotas.refusal(other, 200, 0.2)
    assert "event of 200 bytes" in refusal and "limits.agent_event_bytes_per_second" in refusal
    assert quotas.refusal(other, 10, 0.2) is None  # the refused big one spent no event of the rate
    quotas.prune(1000.0)
    assert quotas.buckets == {}


# -- the agents' history budget -------------------------------------------------------------------


def test_agent_events_never_evict_the_hosts_history():
    log = EventLog(capacity=100, max_bytes=10_000, agent_capacity=5, agent_max_bytes=5 * 1024 * 1024)
    for n in range(3):
        log.append("session.created", "session", msgspec.msgpack.encode(n), now=n)
    big = msgspec.msgpack.encode("x" * (2 * 1024 * 1024))
    for n in range(40):  # what evicted everything before: 40 agent events of 2 MiB
        log.append("agent.blob", "agents:a", big, now=10 + n, from_agent=True)
    log.append("session.created", "session", msgspec.msgpack.encode(3), now=99)
    assert [e.seq for e in log.replay(0, ["session."], 100).events] == [1, 2, 3, 44]
    assert [e.seq for e in log.agents.events] == [42, 43]  # their own 5 MiB budget
    assert [e.seq for e in log.replay(0, [], 100).events] == [1, 2, 3, 42, 43, 44]  # one history, in order
    assert [e.seq for e in log.replay(2, [], 3).events] == [3, 42, 43]
    assert log.first_seq == 1 and log.last_seq == 44


def test_the_first_kept_event_is_the_older_of_the_two_budgets():
    log = EventLog(capacity=1, max_bytes=10_000, agent_capacity=10, agent_max_bytes=10_000)
    log.append("agent.x", "agents:a", b"\x01", now=0, from_agent=True)
    log.append("session.a", "session", b"\x01", now=1)
    log.append("session.b", "session", b"\x01", now=2)
    assert log.first_seq == 1
    assert [e.topic for e in log.replay(0, [], 10).events] == ["agent.x", "session.b"]


# -- the agents' replay budget --------------------------------------------------------------------


def blobs(sizes: list[int]) -> EventLog:
    """A log of agent.b events whose kept sizes (topic and body: a str8 of 2 bytes' header) are `sizes`."""
    log = EventLog(capacity=100, max_bytes=100_000)
    for n, size in enumerate(sizes):
        log.append("agent.b", "a", msgspec.msgpack.encode("x" * (size - len("agent.b") - 2)), now=n)
    assert [len(e.topic) + len(e.body) for e in log.host.events] == sizes
    return log


def seqs(page: ReplayPage) -> list[int]:
    return [event.seq for event in page.events]


def test_a_replay_page_is_cut_at_its_bytes_and_says_whether_more_is_kept():
    log = blobs([50, 50, 50, 200])
    page = log.replay(0, [], 10, max_bytes=120)
    assert seqs(page) == [1, 2] and page.more is True and page.size == 100
    assert log.replay(0, [], 10, max_bytes=150).events == log.replay(0, [], 3).events  # the 200 does not fit
    assert log.replay(0, [], 10, max_bytes=150).more is True
    assert log.replay(0, [], 10, max_bytes=350) == log.replay(0, [], 10)
    assert log.replay(0, [], 10).more is False
    first = log.replay(3, [], 10, max_bytes=1)
    assert seqs(first) == [4] and first.more is False  # one event at least, whatever its size
    assert log.replay(0, [], 4).more is False and log.replay(0, [], 3).more is True  # cut by the count
    assert log.replay(0, ["session."], 10, max_bytes=1).events == []


def test_a_replay_counts_the_kept_events_it_looked_at_and_stops_at_the_first_match_past_its_page():
    """What a replay costs the broker's loop: a replay matching nothing scans the whole history."""
    log = blobs([50, 50, 50, 200])
    for n in range(6):
        log.append("session.x", "session", b"\x01", now=10 + n)
    nothing = log.replay(0, ["nosuch."], 10)
    assert nothing.events == [] and nothing.size == 0 and nothing.scanned == 10
    assert log.replay(2, ["nosuch."], 10).scanned == 8  # only what is after `since`
    cut = log.replay(0, ["agent."], 2)
    assert seqs(cut) == [1, 2] and cut.more is True and cut.scanned == 3  # the third says `more`
    assert log.replay(0, ["agent."], 10).scanned == 10  # no match past the last: it looked to the end
    assert log.replay(0, [], 0).scanned == 0  # just the numbers


def replay_page(size: int = 0, scanned: int = 0) -> ReplayPage:
    return ReplayPage([], size=size, scanned=scanned)


def test_an_agents_replay_allowance_is_its_containers_and_refused_when_spent_with_when_to_ask_again():
    registry = registry_with(agent_replay_bytes_per_second=Size(1000))
    quotas = registry.event_quotas
    agent = peer(registry, b"a1", AGENTS_SOCKET, container="c1")
    other_connection = peer(registry, b"a2", AGENTS_SOCKET, container="c1")
    other_agent = peer(registry, b"b", AGENTS_SOCKET, container="c2")
    assert quotas.replay_allowance(agent, 0.0) == 1000  # a second of the rate
    quotas.charge_replay(agent, replay_page(size=600), 0.0)
    assert quotas.replay_allowance(other_connection, 0.0) == 400  # one container's connections share it
    quotas.charge_replay(
        other_connection, replay_page(size=900), 0.0
    )  # a page's first event, whatever its size
    with pytest.raises(BusError) as caught:
        quotas.replay_allowance(agent, 0.3)  # 300 bytes back of a 500 byte debt
    assert caught.value.code is ErrorCode.RESOURCE_EXHAUSTED
    assert "limits.agent_replay_bytes_per_second (1000 bytes of events)" in caught.value.message
    retry_after = caught.value.details["retry_after"]
    assert retry_after == pytest.approx(
        (200 + 100) / 1000
    )  # the debt left, then a tenth of a second's refill
    assert quotas.replay_allowance(other_agent, 0.3) == 1000
    assert quotas.replay_allowance(agent, 0.301 + retry_after) == pytest.approx(101)
    quotas.prune(10.0)
    assert quotas.replays == {}


def test_an_agent_is_refused_a_replay_while_less_than_a_tenth_of_a_seconds_bytes_is_left():
    """Refused only at none left, a client asking again at once got a page of one event a call."""
    registry = registry_with(agent_replay_bytes_per_second=Size(1000))
    quotas = registry.event_quotas
    agent = peer(registry, b"a", AGENTS_SOCKET, container="c1")
    quotas.charge_replay(agent, replay_page(size=950), 0.0)
    with pytest.raises(BusError) as caught:
        quotas.replay_allowance(agent, 0.0)  # 50 bytes left, of the 100 of a tenth of a second
    assert caught.value.details["retry_after"] == pytest.approx(0.05)
    assert quotas.replay_allowance(agent, 0.051) == pytest.approx(101)


def test_a_replay_is_charged_the_kept_events_it_scanned_when_that_is_more_than_it_sent():
    """A loop of replays matching nothing scanned the whole history on the loop, charged nothing."""
    scan = REPLAY_SCAN_BYTES
    registry = registry_with(agent_replay_bytes_per_second=Size(40 * scan))
    quotas = registry.event_quotas
    agent = peer(registry, b"a", AGENTS_SOCKET, container="c1")
    quotas.charge_replay(agent, replay_page(size=0, scanned=10), 0.0)
    assert quotas.replay_allowance(agent, 0.0) == 30 * scan
    quotas.charge_replay(agent, replay_page(size=5 * scan, scanned=2), 0.0)  # the bytes sent, when more
    assert quotas.replay_allowance(agent, 0.0) == 25 * scan
    quotas.charge_replay(agent, replay_page(scanned=25), 0.0)
    with pytest.raises(BusError):
        quotas.replay_allowance(agent, 0.0)


def test_a_replay_that_looked_at_nothing_leaves_no_bucket_behind():
    """`limit` 0 (a subscription "from now") made a bucket for every such replay, until the next prune."""
    registry = registry_with()
    quotas = registry.event_quotas
    quotas.charge_replay(peer(registry, b"a", AGENTS_SOCKET, container="c1"), replay_page(), 0.0)
    assert quotas.replays == {}
