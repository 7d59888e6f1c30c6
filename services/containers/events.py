"""Engine events -> bus events: which engine happenings become which `container.*` / `image.*` event."""

from __future__ import annotations

from collections import OrderedDict

from baaaht.schemas.base import Event
from baaaht.schemas.containers import (
    ContainerCreated,
    ContainerDied,
    ContainerHealthChanged,
    ContainerPaused,
    ContainerRemoved,
    ContainerStarted,
    ContainerStopped,
    ContainerUnpaused,
    ImagePulled,
)
from baaaht.services.containers.ownership import owner_of
from baaaht.services.containers.runtime import EngineEvent

SIMPLE = {
    "create": ContainerCreated,
    "start": ContainerStarted,
    "stop": ContainerStopped,
    "destroy": ContainerRemoved,
    "pause": ContainerPaused,
    "unpause": ContainerUnpaused,
}
HEALTH_STATES = ("healthy", "unhealthy", "starting")
# The engine reports an OOM kill as its own `oom` event just before `die`; remember it until then.
OOM_MEMORY = 1024


class EventTranslator:
    """Translates the engine's events for this installation's containers (others are ignored)."""

    def __init__(self, install_id: str):
        self.install_id = install_id
        self._oom_killed: OrderedDict[str, bool] = OrderedDict()

    def translate(self, event: EngineEvent) -> Event | None:
        if event.kind == "image":
            return ImagePulled(image=event.id, time=event.time) if event.action == "pull" else None
        attrs = event.attributes
        owner = owner_of(attrs, self.install_id)
        if event.kind != "container" or not owner.ours:
            return None
        common = dict(
            container_id=event.id,
            name=attrs.get("name", ""),
            image=attrs.get("image", ""),
            session_id=owner.session_id,
            role=owner.role,
            time=event.time,
        )
        action = event.action
        if action == "oom":
            self._oom_killed[event.id] = True
            while len(self._oom_killed) > OOM_MEMORY:
                self._oom_killed.popitem(last=False)
            return None
        if action == "die":
            oom_killed = self._oom_killed.pop(event.id, False)
            return ContainerDied(**common, exit_code=_int(attrs.get("exitCode")), oom_killed=oom_killed)
        if action.startswith("health_status"):
            status = action.partition(":")[2].strip()
            return ContainerHealthChanged(**common, status=status if status in HEALTH_STATES else "unknown")
        event_type = SIMPLE.get(action)
        return event_type(**common) if event_type else None


def _int(text: str | None) -> int:
    try:
        return int(text) if text is not None else -1
    except ValueError:
        return -1
