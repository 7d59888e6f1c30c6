"""Which of this installation's containers are orphans (pure decision logic; the service acts on it).

A container is an orphan when its session no longer exists or is closed, and it is older than the grace
period (a fresh container's session may not be visible yet). Containers of other installations, or not
managed by baaaht, are never candidates, whatever the listing returned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Mapping, Sequence

from baaaht.schemas.containers import ContainerSummary
from baaaht.services.containers.hardening import LABEL_INSTALL, LABEL_MANAGED, LABEL_SESSION

SessionVerdict = Literal["open", "closed", "missing"]


@dataclass(frozen=True)
class Removal:
    container: ContainerSummary
    reason: str


@dataclass
class ReconcilePlan:
    remove: list[Removal] = field(default_factory=list)
    kept: int = 0
    too_young: int = 0
    foreign: int = 0


def is_ours(container: ContainerSummary, install_id: str) -> bool:
    labels = container.labels
    return labels.get(LABEL_MANAGED) == "true" and labels.get(LABEL_INSTALL) == install_id


def sessions_to_check(
    containers: Sequence[ContainerSummary], install_id: str, now: float, grace: float
) -> set[str]:
    """The session ids whose state decides the fate of some container."""
    return {
        c.labels.get(LABEL_SESSION, "")
        for c in containers
        if is_ours(c, install_id) and now - c.created >= grace and c.labels.get(LABEL_SESSION)
    }


def plan(
    containers: Sequence[ContainerSummary],
    install_id: str,
    sessions: Mapping[str, SessionVerdict],
    now: float,
    grace: float,
) -> ReconcilePlan:
    """`sessions` must hold a verdict for every id from `sessions_to_check`; a container whose session
    has no verdict is kept (when in doubt, nothing is removed)."""
    result = ReconcilePlan()
    for container in containers:
        if not is_ours(container, install_id):
            result.foreign += 1
            continue
        if now - container.created < grace:
            result.too_young += 1
            continue
        session = container.labels.get(LABEL_SESSION, "")
        verdict = sessions.get(session) if session else "missing"
        if verdict == "closed":
            result.remove.append(Removal(container, f"session {session} is closed"))
        elif verdict == "missing":
            what = f"session {session} does not exist" if session else "it has no session label"
            result.remove.append(Removal(container, what))
        else:
            result.kept += 1
    return result
