"""The test kit (baaaht.bus.testing): the fake bus, the service harness, bounded waits and streams."""

from __future__ import annotations

import threading
import time
from typing import ClassVar

import pytest

from baaaht.bus.background import Stopping, background
from baaaht.bus.errors import not_found
from baaaht.bus.peers import Peer
from baaaht.bus.service import Publisher, Service, on_event, rpc
from baaaht.bus.testing import (
    FakeBus,
    FakeStream,
    Recorded,
    ServiceHarness,
    code_of,
    context,
    error_of,
    serving,
    wait_for,
)
from baaaht.schemas.base import Empty, Event, Request
from baaaht.schemas.containers import ContainerRemoved
from baaaht.schemas.errors import ErrorCode
from baaaht.schemas.policy import PolicyValidate, ValidationResult
from baaaht.schemas.sessions import SessionGet, SessionInfo, SessionState
from tests.services.echo import Count, EchoService, Say, Shout, Tick

# -- the fake bus -------------------------------------------------------------------------------


def test_the_fake_bus_answers_from_its_script_and_records_every_call():
    bus = FakeBus({PolicyValidate: ValidationResult(valid=True)})
    bus.answer("session.get", lambda request: not_found(f"no session {request.session_id}"))
    assert bus.call(PolicyValidate(text="{}"), timeout=2.0, correlation_id="c1") == ValidationResult(
        valid=True
    )
    assert code_of(lambda: bus.call(SessionGet(session_id="s1"))) is ErrorCode.NOT_FOUND
    assert [(c.request, c.timeout, c.correlation_id) for c in bus.calls] == [
        (PolicyValidate(text="{}"), 2.0, "c1"),
        (SessionGet(session_id="s1"), None, ""),
    ]
    assert bus.requests(SessionGet) == [SessionGet(session_id="s1")]
    bus.forget(PolicyValidate)
    error = error_of(lambda: bus.call(PolicyValidate(text="{}")))
    assert error.code is ErrorCode.UNAVAILABLE and "policy.validate" in error.message  # as if none registered


def test_the_fake_bus_sends_what_it_is_given_through_the_wire_format():
    bus = FakeBus(default=lambda request: ValidationResult(valid="yes"))  # not a bool: refused
    with pytest.raises(Exception, match="Expected `bool`"):
        bus.call(PolicyValidate(text="{}"))
    bus.publish(Shout(text="hi"), subtopic="loud")
    assert bus.published == [("echo.shouted.loud", Shout(text="hi"))]
    assert bus.topics() == ["echo.shouted.loud"] and bus.events(ContainerRemoved) == []


def test_waiting_for_an_event_wakes_at_the_publish_and_fails_naming_what_it_waited_for():
    bus = FakeBus()
    threading.Timer(0.05, lambda: bus.publish(Shout(text="late"))).start()
    started = time.monotonic()
    assert bus.wait_for_events(Shout, where=lambda e: e.text == "late", timeout=10) == [Shout(text="late")]
    assert time.monotonic() - started < 5
    with pytest.raises(AssertionError, match=r"timed out after 0.1s waiting for the second shout.*late"):
        bus.wait_for_events(Shout, count=2, timeout=0.1, what="the second shout")
    with pytest.raises(AssertionError, match="waiting for 1 policy.validate"):
        bus.wait_for_requests(PolicyValidate, timeout=0.05)


def test_code_of_fails_when_nothing_is_raised():
    with pytest.raises(AssertionError, match="expected a BusError, the call returned 42"):
        code_of(lambda: 42)


# -- waits and streams --------------------------------------------------------------------------


def test_recorded_waits_are_woken_by_appends_and_bounded():
    recorded: Recorded[int] = Recorded()
    threading.Timer(0.05, recorded.append, args=(7,)).start()
    assert recorded.wait_for_count(1, timeout=10) == [7]
    with pytest.raises(AssertionError, match=r"waiting for 2 records; recorded 1, the last: \[7\]"):
        recorded.wait_for_count(2, timeout=0.05)


def test_a_poll_fails_with_what_it_waited_for_and_the_last_error():
    def never():
        raise AssertionError("still no")

    with pytest.raises(AssertionError, match="waiting for the impossible .*still no"):
        wait_for(never, timeout=0.05, what="the impossible")
    assert wait_for(lambda: "done", timeout=0.05) == "done"


def test_a_fake_stream_nobody_feeds_fails_instead_of_hanging():
    stream = FakeStream([1], timeout=0.05, what="the log stream")
    items = iter(stream)
    assert next(items) == 1
    with pytest.raises(AssertionError, match="the log stream waited 0.05s for an item"):
        next(items)
    stream = FakeStream([1, 2], ended=True)
    assert list(stream) == [1, 2]
    stream.close()
    assert stream.closed.is_set() and list(stream) == []


# -- the service harness ------------------------------------------------------------------------


class Poke(Request, tag="poking.poke", kw_only=True):
    response: ClassVar[type] = Empty
    session_id: str


class Poked(Event, tag="poking.poked", kw_only=True):
    valid: bool


class Poking(Service):
    """Asks two peers, publishes, handles events and has background work: every part a harness fills."""

    name = "poking"

    def __init__(self, prefix: str, *, events: Publisher, policy: Peer, sessions: Peer):
        self.prefix = prefix
        self.events = events
        self.policy = policy
        self.sessions = sessions
        self.removed: list[str] = []
        self.steps: Recorded[str] = Recorded()

    def on_start(self) -> None:
        self.steps.append("on_start")

    @background
    def watch(self, stopping: Stopping) -> None:
        self.steps.append("background")
        stopping.wait(30)

    def on_stop(self) -> None:
        self.steps.append("on_stop")

    @rpc
    def poke(self, request: Poke, ctx) -> Empty:
        self.sessions.get(ctx, session_id=request.session_id)
        valid = self.policy.validate(ctx, text=self.prefix).valid
        self.events.publish(Poked(valid=valid))
        return Empty()

    @on_event("container.*")
    def on_container(self, event: ContainerRemoved) -> None:
        self.removed.append(event.container_id)


def test_the_harness_fills_publisher_and_peers_with_a_recording_fake_bus():
    harness = ServiceHarness(Poking, "{}")
    harness.bus.answer(PolicyValidate, ValidationResult(valid=True))
    harness.bus.answer(SessionGet, lambda request: not_found(f"no session {request.session_id}"))
    assert code_of(lambda: harness.call(Poke(session_id="s1"))) is ErrorCode.NOT_FOUND
    harness.bus.answer(SessionGet, lambda request: _session(request.session_id))
    assert harness.call(Poke(session_id="s1")) == Empty()
    assert harness.bus.events(Poked) == [Poked(valid=True)]
    assert [type(r).__name__ for r in harness.bus.requests()] == [
        "SessionGet",
        "SessionGet",
        "PolicyValidate",
    ]
    assert harness.bus.requests(PolicyValidate)[0].text == "{}"
    with pytest.raises(LookupError, match="Poking has no RPC echo.say"):
        harness.call(Say(text="x"))


def test_a_given_peer_is_used_instead_of_the_fake():
    own = FakeBus(default=ValidationResult(valid=False))
    harness = ServiceHarness(Poking, "{}", policy=Peer(own, "policy", timeout=1.0))
    harness.bus.answer(SessionGet, lambda request: _session(request.session_id))
    harness.call(Poke(session_id="s1"))
    assert harness.bus.events(Poked) == [Poked(valid=False)] and len(own.calls) == 1


def test_a_peer_the_name_does_not_tell_must_be_named():
    class Vague(Service):
        name = "vague"

        def __init__(self, *, judge: Peer):
            self.judge = judge

    with pytest.raises(TypeError, match="pass peers=\\{'judge': NAME\\}"):
        ServiceHarness(Vague)
    assert ServiceHarness(Vague, peers={"judge": "policy"}).service.judge.service == "policy"


def test_delivered_events_reach_the_handlers_whose_pattern_matches():
    harness = ServiceHarness(Poking, "{}")
    assert harness.deliver(ContainerRemoved(container_id="c1")) == 1
    assert harness.deliver(Shout(text="not mine")) == 0
    assert harness.service.removed == ["c1"]


def test_running_brackets_the_block_with_the_life_cycle():
    harness = ServiceHarness(Poking, "{}")
    with harness.running():
        harness.service.steps.wait_for_count(2, what="on_start and the background task")
    assert harness.service.steps == ["on_start", "background", "on_stop"]


def test_streams_and_a_hand_built_service_with_serving():
    harness = ServiceHarness(EchoService)
    assert harness.call(Count(to=3)) == [Tick(n=0), Tick(n=1), Tick(n=2)]
    ticks = harness.stream(Count(to=100))
    assert next(ticks) == Tick(n=0)
    ticks.close()
    with pytest.raises(TypeError, match="echo.say is not a streaming RPC"):
        harness.stream(Say(text="x"))
    service = EchoService(events=FakeBus())
    with serving(service):
        assert service.say(Say(text="hi"), context()).text == "hi"


def _session(session_id: str) -> SessionInfo:
    return SessionInfo(
        id=session_id,
        state=SessionState.ACTIVE,
        owner="alice",
        created_at=0.0,
        updated_at=0.0,
        last_activity_at=0.0,
    )
