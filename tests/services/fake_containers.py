"""A test double of the container manager on the bus: `container.create`, `container.list` and
`container.destroy` over an in-memory table, publishing `container.removed` like the real one.

A container whose spec name starts with `stuck` acknowledges `container.destroy` but never goes
away, as with a hung engine.
"""

from __future__ import annotations

import secrets
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from a checkout

from baaaht.bus.client import BusClient  # noqa: E402
from baaaht.bus.errors import not_found  # noqa: E402
from baaaht.bus.runner import main  # noqa: E402
from baaaht.bus.service import Publisher, Service, rpc  # noqa: E402
from baaaht.schemas.base import Empty  # noqa: E402
from baaaht.schemas.config import Config  # noqa: E402
from baaaht.schemas.containers import (  # noqa: E402
    ContainerCreate,
    ContainerCreated,
    ContainerDestroy,
    ContainerList,
    ContainerListResult,
    ContainerRemoved,
    ContainerSummary,
    CreateResult,
)

STUCK_PREFIX = "stuck"


class FakeContainerService(Service):
    name = "container"
    concurrency = 8

    def __init__(self, events: Publisher):
        self.events = events
        self.containers: dict[str, ContainerSummary] = {}
        self.lock = threading.Lock()

    @classmethod
    def from_config(cls, config: Config, bus: BusClient) -> "FakeContainerService":
        return cls(events=bus)

    @rpc
    def create(self, request: ContainerCreate) -> CreateResult:
        container_id = secrets.token_hex(32)
        name = request.spec.name or f"fake-{container_id[:12]}"
        summary = ContainerSummary(
            id=container_id,
            name=name,
            image=request.spec.image,
            state="running",
            session_id=request.session_id,
        )
        with self.lock:
            self.containers[container_id] = summary
        self.events.publish(
            ContainerCreated(container_id=container_id, name=name, session_id=request.session_id)
        )
        return CreateResult(id=container_id, name=name, spec=request.spec)

    @rpc
    def list(self, request: ContainerList) -> ContainerListResult:
        with self.lock:
            found = [
                c
                for c in self.containers.values()
                if not request.session_id or c.session_id == request.session_id
            ]
        return ContainerListResult(containers=found)

    @rpc
    def destroy(self, request: ContainerDestroy) -> Empty:
        with self.lock:
            summary = self.containers.get(request.id)
            if summary is None:
                raise not_found(f"no container {request.id}")
            if summary.name.startswith(STUCK_PREFIX):
                return Empty()
            del self.containers[request.id]
        self.events.publish(
            ContainerRemoved(container_id=summary.id, name=summary.name, session_id=summary.session_id)
        )
        return Empty()


if __name__ == "__main__":
    main(FakeContainerService)
