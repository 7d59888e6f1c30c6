"""Test doubles for the session manager: a clock, a bus and a container manager for unit tests,
and a host running the real session service beside a container manager double for the rest.

The fake bus sends every request and event through msgpack, so what the service hands to the
real bus must encode and decode as its schema type.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable

import msgspec

from baaaht.bus.errors import BusError, not_found
from baaaht.schemas.base import Empty, Event, Request, target_of, topic_of
from baaaht.schemas.containers import (
    ContainerDestroy,
    ContainerList,
    ContainerListQuery,
    ContainerRemoved,
    ContainerSummary,
)
from baaaht.schemas.errors import ErrorCode

SESSIONS = "baaaht.services.sessions"
FAKE_CONTAINERS = str(Path(__file__).parent / "services" / "fake_containers.py")
SESSION_LIMITS = {
    "sweep_interval": "100ms",
    "close_timeout": "2s",
    "max_sessions": 4,
    "max_message_size": "4KiB",
}


def start_sessions_host(make_host, session: dict | None = None, with_containers: bool = True):
    """A host (from the make_host fixture) running the session service with short test limits
    and, unless told otherwise, the container manager double (tests/services/fake_containers.py)."""
    host = make_host({"session": {**SESSION_LIMITS, **(session or {})}, "policy": {"max_containers": 2}})
    if with_containers:
        host.start_service(FAKE_CONTAINERS, "container")
    host.start_service(SESSIONS, "session")
    return host


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeBus:
    """Records published events; answers calls with handlers registered by target."""

    def __init__(self):
        self.published: list[tuple[str, Event]] = []
        self.handlers: dict[str, Callable[[Request], Any]] = {}
        self.lock = threading.Lock()

    def publish(self, event: Event, subtopic: str = "") -> None:
        topic = topic_of(type(event)) + (f".{subtopic}" if subtopic else "")
        decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(event), type=type(event))
        with self.lock:
            self.published.append((topic, decoded))

    def call(self, request: Request, timeout: float | None = None, correlation_id: str = "") -> Any:
        target = target_of(type(request))
        handler = self.handlers.get(target)
        if handler is None:
            raise BusError(ErrorCode.UNAVAILABLE, f"no instance of the service for {target} is registered")
        decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(request), type=type(request))
        return handler(decoded)

    def events(self, event_type: type[Event]) -> list[Event]:
        with self.lock:
            return [event for _, event in self.published if isinstance(event, event_type)]

    def topics(self) -> list[str]:
        with self.lock:
            return [topic for topic, _ in self.published]


class FakeContainerManager:
    """Answers `container.list` and `container.destroy` on a FakeBus. A destroyed container is
    reported removed through `on_removed` (the service's event handler) unless `report_removals`
    is off, as if the event were lost."""

    def __init__(self, bus: FakeBus, on_removed: Callable[[ContainerRemoved], None]):
        self.containers: dict[str, str] = {}  # container id -> session id
        self.destroyed: list[str] = []
        self.on_removed = on_removed
        self.report_removals = True
        self.lock = threading.Lock()
        bus.handlers[target_of(ContainerListQuery)] = self.list
        bus.handlers[target_of(ContainerDestroy)] = self.destroy

    def add(self, container_id: str, session_id: str) -> None:
        with self.lock:
            self.containers[container_id] = session_id

    def list(self, request: ContainerListQuery) -> ContainerList:
        with self.lock:
            found = [cid for cid, sid in self.containers.items() if sid == request.session_id]
        return ContainerList(
            containers=[
                ContainerSummary(
                    id=cid, name=f"c-{cid}", image="img", state="running", session_id=request.session_id
                )
                for cid in found
            ]
        )

    def destroy(self, request: ContainerDestroy) -> Empty:
        with self.lock:
            session_id = self.containers.pop(request.id, None)
            if session_id is None:
                raise not_found(f"no container {request.id}")
            self.destroyed.append(request.id)
        if self.report_removals:
            self.on_removed(ContainerRemoved(container_id=request.id, session_id=session_id))
        return Empty()
