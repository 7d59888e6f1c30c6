"""A service under test without a bus, in the spirit of nameko's `worker_factory`: the service
class built with its publisher and peers replaced by a recording FakeBus, its RPCs called and its
event handlers fed as the runner would (through msgpack), its life cycle run around a block.

    harness = ServiceHarness(SessionService, store, config, clock=clock)   # events= and the
    harness.bus.answer("container.list", ContainerListResult(containers=[]))     # Peer parameters are fakes
    with harness.running():                                                # on_start, background work
        info = harness.call(SessionCreate(owner="alice"))
        harness.deliver(ContainerRemoved(container_id="c1", session_id=info.id))
    assert harness.bus.events(SessionCreated)

Adapters (a store, a runtime, a gate) are what the test passes; anything it passes for a
publisher or peer is used instead of the fake.
"""

from __future__ import annotations

import contextlib
import inspect
import time
import typing
from typing import Any, Generic, Iterator, TypeVar

import msgspec

from baaaht.bus.background import Background
from baaaht.bus.peers import Peer, requests_of
from baaaht.bus.service import CallContext, Deferred, Service, topic_matches
from baaaht.bus.subscription import Delivery
from baaaht.bus.testing.fakes import FakeBus, context, round_trip
from baaaht.schemas.base import Event, Request, target_of, topic_for

S = TypeVar("S", bound=Service)
PUBLISHER_PARAMETER = "events"
DEFERRED_WAIT = 30.0  # seconds `call` waits for a Deferred answer (a store commit, say)


def peer_service(parameter: str) -> str:
    """The service a Peer parameter names: `policy` -> policy, `containers` -> container."""
    for candidate in (parameter, parameter.removesuffix("s")):
        if requests_of(candidate):
            return candidate
    raise TypeError(
        f"cannot tell which service the peer {parameter!r} is: pass peers={{{parameter!r}: NAME}}"
    )


class ServiceHarness(Generic[S]):
    def __init__(
        self,
        service_type: type[S],
        *args: Any,
        bus: FakeBus | None = None,
        peers: dict[str, str] | None = None,
        peer_timeout: float = 5.0,
        first_backoff: float = 0.05,
        **given: Any,
    ):
        """`service_type(*args, **given)`, with `events` and every parameter annotated `Peer` that is
        not given filled in over `bus` (a new FakeBus by default); `peers` names the service of a
        Peer parameter where its name does not say it."""
        self.bus = bus if bus is not None else FakeBus()
        self.service_type = service_type
        self.first_backoff = first_backoff
        hints = typing.get_type_hints(service_type.__init__)
        parameters = list(inspect.signature(service_type.__init__).parameters)[1 + len(args) :]
        for name in parameters:
            if name in given:
                continue
            if name == PUBLISHER_PARAMETER:
                given[name] = self.bus
            elif hints.get(name) is Peer:
                service = (peers or {}).get(name) or peer_service(name)
                given[name] = Peer(self.bus, service, timeout=peer_timeout)
        self.service: S = service_type(*args, **given)

    # -- as the runner serves it --------------------------------------------------------------

    def call(self, request: Request, ctx: CallContext | None = None) -> Any:
        """Call the RPC of `request` (a streaming one gives the list of what it streamed)."""
        handler, args, stream = self._handler(request, ctx)
        if stream:
            return [round_trip(item) for item in handler(*args)]
        result = handler(*args)
        if isinstance(result, Deferred):  # answered later from another thread, as the runner waits for it
            result = result.wait(DEFERRED_WAIT)
        return None if result is None else round_trip(result)

    def stream(self, request: Request, ctx: CallContext | None = None) -> Iterator[Any]:
        """The items of a streaming RPC as the handler yields them (closing it stops the handler)."""
        handler, args, stream = self._handler(request, ctx)
        if not stream:
            raise TypeError(f"{target_of(type(request))} is not a streaming RPC")
        return handler(*args)

    def _handler(self, request: Request, ctx: CallContext | None):
        target = target_of(type(request))
        spec = self.service_type.rpcs().get(target)
        if spec is None:
            raise LookupError(f"{self.service_type.__name__} has no RPC {target}")
        decoded = round_trip(request)
        args = (decoded, ctx or context()) if spec.wants_context else (decoded,)
        return getattr(self.service, spec.method), args, spec.stream

    def deliver(self, event: Event, subtopic: str = "") -> int:
        """Hand `event` to every handler whose pattern matches its topic, as the runner does; how
        many handlers took it (a test of a handler asserts this is not 0)."""
        topic = topic_for(event, subtopic)
        delivery = Delivery(0, time.time(), topic, "test", msgspec.msgpack.encode(event))
        handled = 0
        for spec in self.service_type.event_handlers():
            if any(topic_matches(pattern, topic) for pattern in spec.patterns):
                argument = delivery.decode(spec.event_type) if spec.event_type else delivery
                getattr(self.service, spec.method)(argument)
                handled += 1
        return handled

    # -- life cycle ---------------------------------------------------------------------------

    def running(self) -> contextlib.AbstractContextManager[S]:
        """The service's life cycle around a block, as in `serving`."""
        return serving(self.service, first_backoff=self.first_backoff)


@contextlib.contextmanager
def serving(service: S, *, first_backoff: float = 0.05) -> Iterator[S]:
    """What the runner does around the requests: `on_start` and the declared background work
    (restarted after `first_backoff` when it fails) for the block; then the background work stops
    and `on_stop` runs."""
    service.on_start()
    work = Background.of_service(service, first_backoff=first_backoff)
    work.start()
    try:
        yield service
    finally:
        work.stop()
        service.on_stop()
