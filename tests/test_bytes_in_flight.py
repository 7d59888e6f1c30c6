"""The broker's byte budget for agents (limits.agent_bytes_in_flight) with a real broker and the real
session service: an agent past it is refused before its request reaches the service while a host
caller is served, and every way a request ends gives its bytes back (an agent locked out for good
would be a worse denial of service than the flood the budget stops).

The service is held with SIGSTOP so that requests stay in flight (well inside the test host's
heartbeat expiry of 5 s); the sizes are small: a max_message_size of 64 KiB and a budget of 100 KiB
hold one message of 60 KB, not two."""

from __future__ import annotations

import concurrent.futures
import contextlib
import signal
import time

import msgspec
import pytest
import zmq

from baaaht.bus import wire
from baaaht.bus.testing import wait_for
from baaaht.schemas.bus import BusServices
from baaaht.schemas.errors import ErrorCode
from baaaht.schemas.sessions import Message, SessionCreate, SessionSendMessage
from tests.test_bus import raw_dealer

LIMITS = {"bus": {"max_message_size": "64KiB"}, "limits": {"agent_bytes_in_flight": "100KiB"}}
CONTENT = "x" * 60_000
REPLY_WAIT = 5.0  # seconds: a broker's refusal comes at once, a held service's answer after SIGCONT


@pytest.fixture
def sessions(make_host):
    host = make_host(LIMITS)
    host.start_service("baaaht.services.sessions", "session")
    return host


@pytest.fixture
def agent(sessions):
    """A raw DEALER on the agent socket, of an agent of its own session, and that session's id."""
    session = sessions.client().call(SessionCreate(owner="flood")).id
    sessions.identify(session)
    dealer = raw_dealer(sessions, "agents")
    yield dealer, session
    dealer.close(0)


def send(dealer: zmq.Socket, request_id: str, session: str, deadline: float = 30.0) -> int:
    """An agent's message of CONTENT to its session; the size of the request's body."""
    body = msgspec.msgpack.encode(SessionSendMessage(session_id=session, role="assistant", content=CONTENT))
    dealer.send(wire.request(request_id, "session.send_message", time.time() + deadline, "", False, body))
    return len(body)


def replies(dealer: zmq.Socket, count: int) -> dict[str, tuple[str, bytes]]:
    """The next `count` replies, by id: (error code or "", body); the broker's heartbeats skipped."""
    found: dict[str, tuple[str, bytes]] = {}
    ends = time.monotonic() + REPLY_WAIT
    while len(found) < count:
        left = ends - time.monotonic()
        assert left > 0 and dealer.poll(left * 1000), f"no reply after {list(found)}"
        envelope = dealer.recv()
        if wire.kind_of(envelope) == wire.REPLY:
            header_bytes, body = wire.split(envelope)
            header = wire.reply_header.decode(header_bytes)
            found[header.id] = (header.error, body)
    return found


def assert_served(reply: tuple[str, bytes]) -> None:
    error, body = reply
    assert error == "", wire.error_body.decode(body)
    assert msgspec.msgpack.decode(body, type=Message).content == CONTENT


def session_in_flight(probe) -> int:
    [service] = probe.call(BusServices(service="session")).services
    return sum(instance.in_flight for instance in service.instances)


@contextlib.contextmanager
def stopped(host):
    """The session service's process stopped: what the broker routes to it stays in flight."""
    process = host.processes["session"]
    process.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        process.send_signal(signal.SIGCONT)  # nothing if it was killed meanwhile


def test_an_agent_past_its_byte_budget_is_refused_while_a_host_caller_is_served(sessions, agent):
    dealer, session = agent
    operator, probe = sessions.client(timeout=30), sessions.client()
    for_the_host = SessionSendMessage(session_id=session, role="user", content=CONTENT)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        with stopped(sessions):
            size = send(dealer, "held", session)
            send(dealer, "over", session)
            refused = replies(dealer, 1)
            host_call = pool.submit(operator.call, for_the_host)
            wait_for(lambda: session_in_flight(probe) == 2, what="the host's call to reach the service")
        assert list(refused) == ["over"]
        error, body = refused["over"]
        assert error == ErrorCode.RESOURCE_EXHAUSTED.value
        assert wire.error_body.decode(body).message == (
            f"session.send_message refused: this caller has {size} bytes in flight and this request is"
            f" {size} bytes, the limit limits.agent_bytes_in_flight is {100 * 1024} bytes: wait for answers"
            " before sending more"
        )
        assert_served(replies(dealer, 1)["held"])
        assert host_call.result(timeout=REPLY_WAIT).content == CONTENT
    send(dealer, "after", session)
    assert_served(replies(dealer, 1)["after"])


@pytest.mark.parametrize(
    ("ending", "answer"),
    [
        ("deadline", ErrorCode.TIMEOUT),
        ("cancel", ErrorCode.CANCELLED),
        ("service gone", ErrorCode.UNAVAILABLE),
    ],
)
def test_every_way_an_agents_request_ends_gives_its_bytes_back(sessions, agent, ending, answer):
    dealer, session = agent
    with stopped(sessions):
        send(dealer, "held", session, deadline=2.0 if ending == "deadline" else 30.0)
        send(dealer, "over", session)
        assert replies(dealer, 1)["over"][0] == ErrorCode.RESOURCE_EXHAUSTED.value  # "held" counts
        if ending == "cancel":
            dealer.send(wire.pack(wire.CANCEL, body=b"held"))
        elif ending == "service gone":
            sessions.kill("session")
        assert replies(dealer, 1)["held"][0] == answer.value
    if ending == "service gone":
        sessions.start_service("baaaht.services.sessions", "session")
    send(dealer, "after", session)  # as big as the budget lets through alone: refused if "held" still counted
    assert_served(replies(dealer, 1)["after"])
