"""Recording fakes of the bus for unit tests: a bus that records calls and events and answers
calls from a script, a bounded stream, and the helpers every test of an error needs.

Everything a fake bus is handed goes through msgpack and back as its schema type, as on the real
bus, so a test fails where the real bus would refuse a message.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable, NamedTuple

import msgspec

from baaaht.bus.errors import BusError
from baaaht.bus.service import CallContext
from baaaht.bus.testing.waits import DEFAULT_TIMEOUT, Recorded
from baaaht.schemas.base import Event, Request, target_of, topic_for
from baaaht.schemas.bus import Caller
from baaaht.schemas.errors import ErrorCode

Answer = Any  # a response, a BusError to raise, or a function of the request giving either


def round_trip(value: Any, as_type: type | None = None) -> Any:
    """`value` encoded with msgpack and decoded as `as_type` (its own type by default)."""
    return msgspec.msgpack.decode(msgspec.msgpack.encode(value), type=as_type or type(value))


class Call(NamedTuple):
    request: Request
    timeout: float | None
    correlation_id: str


class Published(NamedTuple):
    topic: str
    event: Event


class FakeBus:
    """Stands in for the bus a service publishes on and its peers call through.

        bus = FakeBus({"policy.evaluate": decision, SessionGet: not_found("no session s1")})
        bus.answer("container.list", lambda request: ContainerListResult(containers=[]))
        ... bus.calls, bus.requests(SessionGet), bus.published, bus.events(SessionClosed)
        bus.wait_for_events(SessionClosed, 1, what="the close")     # wakes at the publish

    A call of a target with no scripted answer (and no `default`) is refused UNAVAILABLE, as the
    broker refuses a call no instance is registered for."""

    def __init__(self, answers: dict[str | type[Request], Answer] | None = None, *, default: Answer = None):
        self.calls: Recorded[Call] = Recorded()
        self.published: Recorded[Published] = Recorded()
        self.default = default
        self._answers: dict[str, Answer] = {}
        self._lock = threading.Lock()
        for target, answer in (answers or {}).items():
            self.answer(target, answer)

    def answer(self, target: str | type[Request], answer: Answer) -> None:
        """Script the answer to every call of `target` (a wire name or a request type)."""
        with self._lock:
            self._answers[target if isinstance(target, str) else target_of(target)] = answer

    def forget(self, *targets: str | type[Request]) -> None:
        """Drop the scripted answers of `targets` (of all when none is named): their calls are then
        refused as when no instance is registered."""
        with self._lock:
            if not targets:
                self._answers.clear()
            for target in targets:
                self._answers.pop(target if isinstance(target, str) else target_of(target), None)

    # -- the bus as a service sees it ---------------------------------------------------------

    def publish(self, event: Event, subtopic: str = "") -> None:
        topic = topic_for(event, subtopic)
        self.published.append(Published(topic, round_trip(event)))

    def call(self, request: Request, timeout: float | None = None, correlation_id: str = "") -> Any:
        target = target_of(type(request))
        request = round_trip(request)
        self.calls.append(Call(request, timeout, correlation_id))
        with self._lock:
            answer = self._answers.get(target, self.default)
        if answer is None:
            raise BusError(ErrorCode.UNAVAILABLE, f"no instance of the service for {target} is registered")
        result = answer(request) if callable(answer) else answer
        if isinstance(result, BusError):
            raise result
        response_type = getattr(type(request), "response", None)
        return round_trip(result, response_type) if isinstance(result, msgspec.Struct) else result

    # -- what the test reads ------------------------------------------------------------------

    def requests(self, request_type: type[Request] | None = None) -> list[Request]:
        return [c.request for c in self.calls if request_type is None or isinstance(c.request, request_type)]

    def events(self, event_type: type[Event] | None = None) -> list[Event]:
        return [p.event for p in self.published if event_type is None or isinstance(p.event, event_type)]

    def topics(self) -> list[str]:
        return [p.topic for p in self.published]

    def wait_for_events(
        self,
        event_type: type[Event] | None = None,
        count: int = 1,
        *,
        where: Callable[[Event], bool] = lambda _event: True,
        timeout: float = DEFAULT_TIMEOUT,
        what: str = "",
    ) -> list[Event]:
        """Block until `count` events (of `event_type`, for which `where` holds) are published;
        those events. Wakes at each publish."""

        def enough(published: list[Published]):
            found = [
                p.event
                for p in published
                if (event_type is None or isinstance(p.event, event_type)) and where(p.event)
            ]
            return found if len(found) >= count else None

        name = event_type.__name__ if event_type else "event"
        return self.published.wait_until(enough, timeout, what or f"{count} {name} published")

    def wait_for_requests(
        self, request_type: type[Request], count: int = 1, timeout: float = DEFAULT_TIMEOUT, what: str = ""
    ) -> list[Request]:
        """Block until `count` calls with a `request_type` were made; those requests."""

        def enough(calls: list[Call]):
            found = [c.request for c in calls if isinstance(c.request, request_type)]
            return found if len(found) >= count else None

        return self.calls.wait_until(enough, timeout, what or f"{count} {target_of(request_type)} call(s)")


_END = object()


class FakeStream:
    """A closable stream fed by the test (`put`, `end`) that blocks like an engine response, for
    at most `timeout` seconds per item: a test that forgets to feed or end it fails naming `what`
    instead of hanging."""

    def __init__(
        self, items: list | None = None, ended: bool = False, *, timeout: float = 30.0, what: str = "a stream"
    ):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.closed = threading.Event()
        self.timeout = timeout
        self.what = what
        for item in items or []:
            self._queue.put(item)
        if ended:
            self.end()

    def put(self, item) -> None:
        self._queue.put(item)

    def end(self) -> None:
        self._queue.put(_END)

    def __iter__(self):
        while True:
            try:
                item = self._queue.get(timeout=self.timeout)
            except queue.Empty:
                raise AssertionError(
                    f"{self.what} waited {self.timeout}s for an item: the test neither put one nor ended it"
                ) from None
            if item is _END or self.closed.is_set():
                return
            yield item

    def close(self) -> None:
        self.closed.set()
        self._queue.put(_END)


def error_of(call: Callable[[], Any]) -> BusError:
    """The BusError `call()` raises; fails when it returns instead."""
    try:
        result = call()
    except BusError as exc:
        return exc
    raise AssertionError(f"expected a BusError, the call returned {result!r}")


def code_of(call: Callable[[], Any]) -> ErrorCode:
    """The error code of the BusError `call()` raises."""
    return error_of(call).code


# A container id for callers of tests that do not care which container they come from.
SOME_CONTAINER = "c0" * 32


def agent_caller(session: str, role: str = "agent", container: str = SOME_CONTAINER) -> Caller:
    """A caller as the broker stamps a peer on the agent socket whose container's identity names
    `session` and `role` (agent, assistant or worker)."""
    return Caller(
        socket="agents",
        peer="a9e47",
        uid=1000,
        gid=1000,
        pid=4242,
        role=role,
        session=session,
        container=container,
    )


def operator_caller(uid: int = 1000) -> Caller:
    """A caller as the broker stamps `baaaht-ctl` (any unregistered peer on the services socket)."""
    return Caller(socket="services", peer="0fe7a", uid=uid, gid=uid, pid=4243, role="operator")


def service_caller(service: str) -> Caller:
    """A caller as the broker stamps a registered instance of `service`."""
    return Caller(
        socket="services", peer="5e7c1", service=service, uid=1000, gid=1000, pid=4244, role="service"
    )


def context(timeout: float = 10.0, *, caller: Caller | None = None, correlation_id: str = "") -> CallContext:
    """A CallContext as the runner makes one: a deadline `timeout` seconds from now, for `caller` (the
    operator unless given: `agent_caller`, `service_caller`)."""
    return CallContext(
        deadline=time.time() + timeout, caller=caller or operator_caller(), correlation_id=correlation_id
    )
