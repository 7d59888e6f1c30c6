"""How a service is declared: a class whose typed methods are its RPCs.

    class SessionService(Service):
        name = "session"

        @rpc
        def create(self, req: SessionCreate, ctx: CallContext) -> SessionInfo: ...

        @rpc(stream=True)
        def watch(self, req: SessionWatch, ctx: CallContext) -> Iterator[SessionUpdate]: ...

        @on_event("container.removed", "container.died")
        def on_container_gone(self, event: ContainerRemoved) -> None: ...

The bus target of an RPC is the tag of its request type (`session.create`), so
the schema, the handler and every client agree on one name. Handlers run on a
thread pool (see docs/PROTOCOL.md, "Threads"): they may block.
"""

from __future__ import annotations

import inspect
import threading
import time
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator

from baaaht.bus.errors import BusError
from baaaht.schemas.base import SCHEMA_VERSION, Event, Request, target_of
from baaaht.schemas.bus import Caller
from baaaht.schemas.errors import ErrorCode


@dataclass
class CallContext:
    """What a handler knows about the call it serves."""

    request_id: str = ""
    correlation_id: str = ""
    deadline: float = float("inf")
    caller: Caller = field(default_factory=Caller)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def remaining(self) -> float:
        return self.deadline - time.time()

    def check(self) -> None:
        """Raise if the caller gave up: long handlers call this between steps."""
        if self.cancelled.is_set():
            raise BusError(ErrorCode.CANCELLED, "the caller cancelled the call")
        if self.remaining() <= 0:
            raise BusError(ErrorCode.TIMEOUT, "the call's deadline passed")


@dataclass(frozen=True)
class RpcSpec:
    target: str
    method: str
    request_type: type[Request]
    stream: bool
    wants_context: bool


@dataclass(frozen=True)
class EventSpec:
    patterns: tuple[str, ...]
    method: str
    event_type: type | None


class Publisher(typing.Protocol):
    def publish(self, event: Event, subtopic: str = "") -> None: ...

    def call(self, request: Request, timeout: float | None = None, correlation_id: str = "") -> Any: ...

    def stream(self, request: Request, timeout: float | None = None) -> Iterator[Any]: ...


def rpc(fn: Callable | None = None, *, stream: bool = False):
    def mark(f: Callable) -> Callable:
        f.__baaaht_rpc__ = {"stream": stream}
        return f

    return mark(fn) if fn is not None else mark


def on_event(*patterns: str):
    """Run the method for every event whose topic matches one of the patterns
    (`container.removed`, `container.*`, or `*`)."""

    def mark(f: Callable) -> Callable:
        f.__baaaht_events__ = patterns
        return f

    return mark


def topic_matches(pattern: str, topic: str) -> bool:
    if pattern == "*":
        return True
    if pattern.endswith(".*"):
        return topic.startswith(pattern[:-1])
    return topic == pattern or topic.startswith(pattern + ".")


class Service:
    """Base for bus services. `bus` is set by the runner before `start`."""

    name: ClassVar[str] = ""
    version: ClassVar[int] = SCHEMA_VERSION  # registered with the broker, shown by `bus.services`
    concurrency: ClassVar[int] = 8  # handlers run at once; the broker balances on in-flight / this
    bus: Publisher

    def start(self) -> None:
        """Called once connected, before the first request is served."""

    def stop(self) -> None:
        """Called after the last in-flight request finished or timed out."""

    def health(self) -> tuple[bool, str]:
        """(healthy, reason) as shown by `bus.services` and `baaaht-ctl status`."""
        return True, ""

    @classmethod
    def rpcs(cls) -> dict[str, RpcSpec]:
        found = {}
        for method_name, marker, argument_type, arity in cls._marked("__baaaht_rpc__"):
            if not (isinstance(argument_type, type) and issubclass(argument_type, Request)):
                raise TypeError(f"{cls.__name__}.{method_name}: first argument must be a Request type")
            target = target_of(argument_type)
            if not target.startswith(cls.name + "."):
                raise TypeError(f"{cls.__name__}.{method_name}: {target} is not in service {cls.name!r}")
            found[target] = RpcSpec(target, method_name, argument_type, marker["stream"], arity > 1)
        return found

    @classmethod
    def event_handlers(cls) -> list[EventSpec]:
        return [
            EventSpec(tuple(patterns), method_name, argument_type)
            for method_name, patterns, argument_type, _arity in cls._marked("__baaaht_events__")
        ]

    @classmethod
    def _marked(cls, marker_name: str):
        """(name, marker, type of the first argument, number of arguments) of each marked method."""
        for method_name, fn in inspect.getmembers(cls, inspect.isfunction):
            marker = getattr(fn, marker_name, None)
            if marker is not None:
                params = list(inspect.signature(fn).parameters)[1:]
                argument_type = typing.get_type_hints(fn).get(params[0]) if params else None
                yield method_name, marker, argument_type, len(params)
