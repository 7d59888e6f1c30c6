"""The engine's own event feed (container and image events), normalised to EngineEvent."""

from __future__ import annotations

from typing import Iterator

import docker

from baaaht.services.containers.docker_runtime.connection import Connection
from baaaht.services.containers.docker_runtime.streams import EngineStream
from baaaht.services.containers.runtime import EngineEvent

NANO = 1_000_000_000


class Events:
    engine: Connection

    def events(self, since: float) -> EngineStream[EngineEvent]:
        params = {"filters": docker.utils.convert_filters({"type": ["container", "image"]})}
        if since:
            params["since"] = f"{since:.9f}"

        def parse(api, response) -> Iterator[EngineEvent]:
            for raw in api._stream_helper(response, decode=True):
                yield engine_event(raw)

        return self.engine.open_stream("events", "", "get", "/events", params, parse)


def engine_event(raw: dict) -> EngineEvent:
    actor = raw.get("Actor") or {}
    when = raw.get("timeNano")
    return EngineEvent(
        kind=raw.get("Type", ""),
        action=raw.get("Action", ""),
        id=actor.get("ID", raw.get("id", "")),
        time=when / NANO if when else float(raw.get("time", 0)),
        attributes=dict(actor.get("Attributes") or {}),
    )
