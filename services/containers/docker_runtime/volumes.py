"""Named volumes: create with labels, inspect, list by label, remove."""

from __future__ import annotations

import datetime

from baaaht.schemas.containers import VolumeInfo
from baaaht.services.containers.docker_runtime.connection import Connection
from baaaht.services.containers.ownership import LABEL_SESSION


class Volumes:
    engine: Connection

    def create_volume(self, name: str, labels: dict[str, str]) -> VolumeInfo:
        raw = self.engine.call(
            "volume create", name, lambda api: api.create_volume(name=name, driver="local", labels=labels)
        )
        return volume_info(raw)

    def inspect_volume(self, name: str) -> VolumeInfo:
        return volume_info(self.engine.call("volume inspect", name, lambda api: api.inspect_volume(name)))

    def list_volumes(self, labels: dict[str, str]) -> list[VolumeInfo]:
        filters = {"label": [f"{key}={value}" for key, value in labels.items()]}
        found = self.engine.call("volume list", "", lambda api: api.volumes(filters=filters))
        return [volume_info(raw) for raw in found.get("Volumes") or []]

    def remove_volume(self, name: str) -> None:
        self.engine.call("volume remove", name, lambda api: api.remove_volume(name))


def volume_info(raw: dict) -> VolumeInfo:
    labels = raw.get("Labels") or {}
    return VolumeInfo(
        name=raw["Name"],
        session_id=labels.get(LABEL_SESSION, ""),
        labels=labels,
        created=_unix_time(raw.get("CreatedAt") or ""),
    )


def _unix_time(text: str) -> float:
    """The engine's RFC 3339 time (`2026-12-01T09:00:25Z`, or with an offset) in unix seconds; 0 if absent."""
    if not text:
        return 0.0
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
