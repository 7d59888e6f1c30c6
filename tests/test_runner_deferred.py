"""Handlers that return a Deferred: the runner answers when another thread settles it, and the
handler's thread serves other calls meanwhile."""

from __future__ import annotations

import contextlib
import threading
from typing import ClassVar, Iterator

import pytest

from baaaht.bus import wire
from baaaht.bus.client import BusClient
from baaaht.bus.errors import BusError, precondition
from baaaht.bus.runner import ServiceRunner
from baaaht.bus.service import Deferred, Service, rpc
from baaaht.bus.testing import wait_for
from baaaht.common.endpoints import Endpoints
from baaaht.schemas.base import Empty, Request, Response
from baaaht.schemas.bus import BusPing
from baaaht.schemas.errors import ErrorCode
from tests.test_runner import instance_state, serve_in_thread


class Held(Response, kw_only=True):
    text: str


class Hold(Request, tag="later.hold", kw_only=True):
    response: ClassVar[type] = Held
    text: str


class Release(Request, tag="later.release", kw_only=True):
    response: ClassVar[type] = Empty


class Peek(Request, tag="later.peek", kw_only=True):
    response: ClassVar[type] = Held


class Ask(Request, tag="later.ask", kw_only=True):
    response: ClassVar[type] = Empty


class Later(Service):
    """One handler thread; `hold` answers only when `release` settles what it returned."""

    name = "later"
    concurrency = 1

    def __init__(self) -> None:
        self.held: list[tuple[str, Deferred]] = []
        self.lock = threading.Lock()

    @rpc(inline=True)
    def ask(self, request: Ask) -> Empty:
        """What an inline handler must not do: call the bus (set by the test)."""
        self.bus.call(BusPing(), timeout=10)
        return Empty()

    @rpc(inline=True)
    def peek(self, request: Peek) -> Held:
        """How many answers are held, and on which thread that was asked."""
        return Held(text=f"{len(self.held)} on {threading.current_thread().name}")

    @rpc
    def hold(self, request: Hold) -> Deferred:
        answer = Deferred()
        with self.lock:
            self.held.append((request.text, answer))
        return answer

    @rpc
    def release(self, request: Release) -> Empty:
        with self.lock:
            held, self.held = self.held, []

        def settle() -> None:  # from another thread, as a store's committer would
            for text, answer in held:
                if text == "refuse":
                    answer.settle(error=precondition("refused on purpose", text=text))
                else:
                    answer.settle(Held(text=text.upper()))

        threading.Thread(target=settle).start()
        return Empty()


@contextlib.contextmanager
def serving_later(host) -> Iterator[tuple[BusClient, ServiceRunner, Later]]:
    """(a probe, the runner, the service) of a healthy Later served in a thread, stopped afterwards."""
    probe = host.client()
    runner = ServiceRunner(Later, Endpoints.for_config(host.config.bus), heartbeat_interval=0.2)
    service = Later()
    thread = serve_in_thread(runner, service)
    try:
        wait_for(lambda: instance_state(probe, "later") == (True, ""), what="the service to be healthy")
        yield probe, runner, service
    finally:
        runner.stop()
        thread.join(30)


def test_a_deferred_answer_comes_when_settled_and_frees_the_handler_thread_meanwhile(host):
    with serving_later(host) as (probe, _runner, service):
        outcomes: dict[str, object] = {}

        def call(text: str) -> None:
            try:
                outcomes[text] = host.client(timeout=10).call(Hold(text=text)).text
            except BusError as error:
                outcomes[text] = error.code

        callers = [threading.Thread(target=call, args=(text,)) for text in ("one", "refuse", "two")]
        for caller in callers:
            caller.start()
        wait_for(lambda: len(service.held) == 3, what="three calls held at once by one handler thread")
        assert outcomes == {}
        probe.call(Release())  # served by the one handler thread while three answers are pending
        for caller in callers:
            caller.join(10)
        assert outcomes == {"one": "ONE", "two": "TWO", "refuse": ErrorCode.FAILED_PRECONDITION}


def test_a_deferred_is_settled_once_and_waited_for_with_a_bound():
    answer = Deferred()
    with pytest.raises(TimeoutError):
        answer.wait(0.01)
    seen: list[object] = []
    answer.on_settled(lambda settled: seen.append(settled.result))
    answer.settle("done")
    assert seen == ["done"] and answer.wait(0) == "done"
    with pytest.raises(RuntimeError, match="settled once"):
        answer.settle("again")
    refused = Deferred()
    refused.settle(error=precondition("no"))
    with pytest.raises(BusError):
        refused.wait(0)
    late: list[object] = []
    refused.on_settled(lambda settled: late.append(settled.error.code))  # settled already: called at once
    assert late == [ErrorCode.FAILED_PRECONDITION]


def test_a_deferred_never_settled_is_answered_timeout_at_its_deadline_and_frees_its_callers_share(host):
    with serving_later(host) as (_probe, runner, service):
        caller = host.client(timeout=0.5)
        with pytest.raises(BusError) as caught:
            caller.call(Hold(text="forgotten"))  # what should settle it never does
        assert caught.value.code is ErrorCode.TIMEOUT
        [(_, forgotten)] = service.held
        # The held call had the caller's one share of the one handler thread: this call of the same
        # caller is served only once the overdue answer is expired and the share freed. Its late
        # settle of the forgotten answer is dropped, not raised (the call was answered).
        caller.call(Release(), timeout=10)
        assert forgotten.error.code is ErrorCode.TIMEOUT
        wait_for(lambda: not runner.deferred and not runner.active, what="the calls to be done")


def test_a_deferred_expires_only_while_unsettled():
    answer = Deferred()
    answer.settle("done")
    assert answer.expire(BusError(ErrorCode.TIMEOUT, "late")) is False and answer.wait(0) == "done"
    expired = Deferred()
    assert expired.expire(BusError(ErrorCode.TIMEOUT, "late")) is True
    expired.settle("after")  # dropped
    with pytest.raises(BusError):
        expired.wait(0)


def test_an_inline_call_is_answered_from_the_io_thread_straight_to_the_socket(host):
    with serving_later(host) as (probe, runner, _service):
        queued: list[bytes] = []
        put = runner.connection._put
        runner.connection._put = lambda item: (queued.append(item), put(item))
        assert probe.call(Peek()).text == "0 on baaaht-bus-io"
        assert not [item for item in queued if isinstance(item, bytes) and item.startswith(wire.REPLY)]


def test_a_reply_from_the_io_thread_still_goes_out_behind_what_was_queued_before_it(host):
    with serving_later(host) as (probe, runner, _service):
        queued: list[bytes] = []
        put = runner.connection._put
        runner.connection._put = lambda item: (queued.append(item), put(item))
        # Queued without a wake-up (as by another thread an instant before), so still in the outbox when
        # the call is served: the reply joins the outbox behind it rather than overtake it.
        runner.connection._outbox.put(wire.pack(wire.HEARTBEAT, body=runner._health()))
        assert probe.call(Peek()).text == "0 on baaaht-bus-io"
        assert [item for item in queued if item.startswith(wire.REPLY)]


def test_an_inline_handler_that_calls_the_bus_fails_at_once_instead_of_stalling_its_connection(host):
    with serving_later(host) as (probe, runner, service):
        service.bus = runner.bus
        with pytest.raises(BusError) as caught:
            probe.call(Ask(), timeout=5)
        assert caught.value.code is ErrorCode.INTERNAL and "would wait for itself" in caught.value.message
        assert probe.call(Peek()).text == "0 on baaaht-bus-io"  # the connection still serves
