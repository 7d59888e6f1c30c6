"""Test doubles for the session manager: a clock and a container manager (answering on the test
kit's FakeBus) for unit tests, and a host running the real session service beside a container
manager double for the rest."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

from baaaht.bus.errors import not_found
from baaaht.bus.testing import FakeBus, next_event
from baaaht.schemas.base import Empty
from baaaht.schemas.containers import (
    ContainerDestroy,
    ContainerList,
    ContainerListResult,
    ContainerRemoved,
    ContainerSummary,
)
from baaaht.schemas.sessions import SessionGet, SessionInfo, SessionState

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


def wait_for_state(
    client, session_id: str, state: SessionState, what: str, timeout: float = 10.0
) -> SessionInfo:
    """The session once it is in `state`: now, or at the session.updated that puts it there."""
    with client.subscribe(["session.updated"]) as updates:  # before looking: no change is missed
        info = client.call(SessionGet(session_id=session_id))
        if info.state is state:
            return info
        delivery = next_event(
            updates,
            lambda d: d.event.session.id == session_id and d.event.session.state is state,
            timeout,
            what,
        )
        return delivery.event.session


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


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
        bus.answer(ContainerList, self.list)
        bus.answer(ContainerDestroy, self.destroy)

    def add(self, container_id: str, session_id: str) -> None:
        with self.lock:
            self.containers[container_id] = session_id

    def list(self, request: ContainerList) -> ContainerListResult:
        with self.lock:
            found = [cid for cid, sid in self.containers.items() if sid == request.session_id]
        return ContainerListResult(
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
