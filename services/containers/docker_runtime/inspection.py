"""Inspect, health and listing: the engine's answers about containers as schema types."""

from __future__ import annotations

from baaaht.schemas.containers import ContainerHealthReport, ContainerInfo, ContainerSummary
from baaaht.services.containers.docker_runtime.connection import Connection
from baaaht.services.containers.ownership import LABEL_ROLE, LABEL_SESSION


class Inspection:
    engine: Connection

    def inspect(self, container: str) -> ContainerInfo:
        return container_info(
            self.engine.call("inspect", container, lambda api: api.inspect_container(container))
        )

    def health(self, container: str) -> ContainerHealthReport:
        return health_report(
            self.engine.call("health", container, lambda api: api.inspect_container(container))
        )

    def list(self, labels: dict[str, str]) -> list[ContainerSummary]:
        filters = {"label": [f"{key}={value}" for key, value in labels.items()]}
        rows = self.engine.call("list", "", lambda api: api.containers(all=True, filters=filters))
        return [container_summary(row) for row in rows]


def _time_or_empty(value: str | None) -> str:
    return "" if not value or value.startswith("0001-") else value


def container_info(raw: dict) -> ContainerInfo:
    state = raw.get("State") or {}
    labels = (raw.get("Config") or {}).get("Labels") or {}
    status = state.get("Status", "unknown")
    health = state.get("Health")
    return ContainerInfo(
        id=raw["Id"],
        name=raw.get("Name", "").lstrip("/"),
        image=(raw.get("Config") or {}).get("Image", ""),
        state=status,
        session_id=labels.get(LABEL_SESSION, ""),
        role=labels.get(LABEL_ROLE, ""),
        labels=labels,
        created=raw.get("Created", ""),
        started_at=_time_or_empty(state.get("StartedAt")),
        finished_at=_time_or_empty(state.get("FinishedAt")),
        exit_code=state.get("ExitCode") if status in ("exited", "dead") else None,
        oom_killed=bool(state.get("OOMKilled")),
        error=state.get("Error", ""),
        health=health.get("Status") if health else None,
        pid=state.get("Pid", 0),
        restart_count=raw.get("RestartCount", 0),
    )


def container_summary(row: dict) -> ContainerSummary:
    labels = row.get("Labels") or {}
    names = row.get("Names") or [""]
    return ContainerSummary(
        id=row["Id"],
        name=names[0].lstrip("/"),
        image=row.get("Image", ""),
        state=row.get("State", "unknown"),
        status=row.get("Status", ""),
        session_id=labels.get(LABEL_SESSION, ""),
        role=labels.get(LABEL_ROLE, ""),
        created=float(row.get("Created", 0)),
        labels=labels,
    )


def health_report(raw: dict) -> ContainerHealthReport:
    """Engine health when the container has a healthcheck; otherwise derived from its state.
    A stopped container cannot become healthy, so it reports `unhealthy` whatever its last check said."""
    state = raw.get("State") or {}
    status = state.get("Status", "unknown")
    health = state.get("Health")
    stopped = status in ("exited", "dead")
    if health:
        checks = health.get("Log") or []
        return ContainerHealthReport(
            status="unhealthy" if stopped else health.get("Status", "unknown"),
            has_healthcheck=True,
            failing_streak=health.get("FailingStreak", 0),
            last_output=(checks[-1].get("Output") or "").strip() if checks else "",
            state=status,
        )
    if status == "running":
        derived = "healthy"
    elif stopped and (state.get("OOMKilled") or state.get("ExitCode", 0) != 0):
        derived = "unhealthy"
    else:
        derived = "unknown"
    return ContainerHealthReport(status=derived, has_healthcheck=False, state=status)
