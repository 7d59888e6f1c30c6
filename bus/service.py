"""How a service is declared: a class whose typed methods are its RPCs.

    class SessionService(Service):
        name = "session"

        def __init__(self, store: SessionStore, *, events: Publisher, containers: Peer): ...

        @classmethod
        def from_config(cls, config: Config, bus: BusClient) -> "SessionService": ...

        @rpc
        def create(self, req: SessionCreate, ctx: CallContext) -> SessionInfo: ...

        @rpc(stream=True)
        def watch(self, req: SessionWatch, ctx: CallContext) -> Iterator[SessionUpdate]: ...

        @on_event("container.removed", "container.died")
        def on_container_gone(self, event: ContainerRemoved) -> None: ...

        @background(every=lambda self: self.sweep_interval)
        def sweep(self) -> None: ...

The bus target of an RPC is the tag of its request type (`session.create`), so
the schema, the handler and every client agree on one name, and a method may be
called what it does (`start`, `list`). Handlers run on a thread pool (see
docs/PROTOCOL.md, "Threads"): they may block, or return a `Deferred` that another
thread settles with the answer. One that never waits may say so (`@rpc(inline=True)`)
and is then mostly served on the connection's I/O thread.

The life cycle is a separate set of hooks (`on_start`, `on_stop`, `on_reload`,
`health_report`) that the runner calls; none of them can be an RPC, an event
handler or background work. A constructor takes the service's adapters, its peers
and its publisher and does no I/O; `from_config` builds the real ones.
"""

from __future__ import annotations

import inspect
import threading
import time
import typing
from dataclasses import dataclass, field
from typing import Callable, ClassVar

from baaaht.bus.background import BackgroundSpec
from baaaht.bus.errors import BusError
from baaaht.schemas.base import SCHEMA_VERSION, SESSION_SEPARATOR, Event, Request, target_of
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


class Deferred:
    """An answer that comes later, from another thread. A handler whose result is made elsewhere (the
    session store's committer thread) returns one; the runner answers the call once it is settled,
    and the handler's thread serves other calls meanwhile. `wait` is for direct callers (unit tests).
    One never settled by its call's deadline is expired by the runner: the caller is answered TIMEOUT
    and its share freed, and the late settle is dropped."""

    __slots__ = ("result", "error", "_done", "_expired", "_callback", "_lock", "_settled")

    def __init__(self) -> None:
        self.result: object = None
        self.error: BaseException | None = None
        self._done = False
        self._expired = False
        self._callback: Callable[[Deferred], None] | None = None
        self._lock = threading.Lock()
        self._settled = threading.Lock()  # held until settled: a lock is cheaper than an Event
        self._settled.acquire()

    def settle(self, result: object = None, error: BaseException | None = None) -> None:
        """The answer: `result`, or `error` (a BusError crosses the wire with its code)."""
        self._finish(result, error, expired=False)

    def expire(self, error: BaseException) -> bool:
        """Settle it with `error` unless it is settled already; False if it was."""
        return self._finish(None, error, expired=True)

    def _finish(self, result: object, error: BaseException | None, expired: bool) -> bool:
        with self._lock:
            if self._done:
                if self._expired or expired:  # an answer after the deadline's, or a deadline after one
                    return False
                raise RuntimeError("a Deferred is settled once")
            self.result, self.error, self._done, self._expired = result, error, True, expired
            callback = self._callback
        self._settled.release()
        if callback is not None:
            callback(self)
        return True

    def on_settled(self, callback: Callable[[Deferred], None]) -> None:
        """Call `callback(self)` once settled: at once if it is, else on the thread that settles it."""
        with self._lock:
            if not self._done:
                self._callback = callback
                return
        callback(self)

    def wait(self, timeout: float) -> object:
        """The result, or raise the error, once settled; TimeoutError after `timeout` seconds."""
        if not self._settled.acquire(timeout=timeout):
            raise TimeoutError(f"the answer did not come within {timeout:g}s")
        self._settled.release()
        if self.error is not None:
            raise self.error
        return self.result


@dataclass(frozen=True)
class RpcSpec:
    target: str
    method: str
    request_type: type[Request]
    stream: bool
    wants_context: bool
    inline: bool = False  # served on the connection's I/O thread when the caller's turn allows (rpc())


@dataclass(frozen=True)
class EventSpec:
    patterns: tuple[str, ...]
    method: str
    event_type: type | None


class Publisher(typing.Protocol):
    """Where a service publishes its events: the runner's bus client, a recorder in unit tests."""

    def publish(self, event: Event, subtopic: str = "") -> None: ...


def rpc(fn: Callable | None = None, *, stream: bool = False, inline: bool = False):
    """Mark a method as an RPC. `inline=True` declares that its handler never waits: it validates,
    reads memory (or one row by its key) and answers at once, or hands the work to another thread and
    returns a Deferred. The runner then serves it on the connection's I/O thread, without the hand-offs
    to and from a handler thread, whenever the caller (a host peer: an agent's calls always take turns
    in the fair queue) has no call waiting and is below its share of the handler threads
    (bus/runner.py). Such a handler must not call the bus: the I/O thread would wait for a reply only
    it can receive."""
    if stream and inline:
        raise TypeError("a stream cannot be inline: it waits for what it sends")

    def mark(f: Callable) -> Callable:
        f.__baaaht_rpc__ = {"stream": stream, "inline": inline}
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
    """`x.*` matches every topic under `x.`; `x` matches `x`, its subtopics `x.…` and its sessions'
    `x/<session id>` (schemas/base.py topic_for)."""
    if pattern == "*":
        return True
    if pattern.endswith(".*"):
        return topic.startswith(pattern[:-1])
    return topic == pattern or topic.startswith((pattern + ".", pattern + SESSION_SEPARATOR))


LIFECYCLE_HOOKS = ("on_start", "on_stop", "on_reload", "health_report")
_MARKERS = ("__baaaht_rpc__", "__baaaht_events__", "__baaaht_background__")


class Service:
    """Base for bus services; `bus/runner.py` calls the hooks in this order: `on_start`, then
    requests, events and background work, then `on_stop`; `on_reload` on SIGHUP; `health_report`
    at every heartbeat."""

    name: ClassVar[str] = ""
    version: ClassVar[int] = SCHEMA_VERSION  # registered with the broker, shown by `bus.services`
    concurrency: ClassVar[int] = 8  # handlers run at once; the broker balances on in-flight / this

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for hook in LIFECYCLE_HOOKS:
            fn = cls.__dict__.get(hook)
            if fn is not None and any(hasattr(fn, marker) for marker in _MARKERS):
                raise TypeError(f"{cls.__name__}.{hook} is a life-cycle hook: it cannot also be bus work")

    def on_start(self) -> None:
        """Registered (as unhealthy "starting", so nothing is routed here yet), before the first
        request, event or background run: do the I/O that makes the service ready."""

    def on_stop(self) -> None:
        """After the last request, event handler and background task finished: release adapters."""

    def on_reload(self) -> None:
        """SIGHUP: take up what can change without a restart (a policy file, say)."""

    def health_report(self) -> tuple[bool, str]:
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
            found[target] = RpcSpec(
                target, method_name, argument_type, marker["stream"], arity > 1, marker["inline"]
            )
        return found

    @classmethod
    def event_handlers(cls) -> list[EventSpec]:
        return [
            EventSpec(tuple(patterns), method_name, argument_type)
            for method_name, patterns, argument_type, _arity in cls._marked("__baaaht_events__")
        ]

    @classmethod
    def background_tasks(cls) -> list[BackgroundSpec]:
        return [marker for _name, marker, _type, _arity in cls._marked("__baaaht_background__")]

    @classmethod
    def _marked(cls, marker_name: str):
        """(name, marker, type of the first argument, number of arguments) of each marked method."""
        for method_name, fn in inspect.getmembers(cls, inspect.isfunction):
            marker = getattr(fn, marker_name, None)
            if marker is not None:
                params = list(inspect.signature(fn).parameters)[1:]
                argument_type = typing.get_type_hints(fn).get(params[0]) if params else None
                yield method_name, marker, argument_type, len(params)
