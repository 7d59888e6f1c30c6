"""Which of this installation's containers and volumes are orphans (pure decision logic; the service acts
on it).

Only what `owner_of` calls a session's is judged by its session: a container is an orphan when its
session is closed or no longer exists (or it has no session label); a session volume outlives the close
(its files may still be read) and is an orphan once its session no longer exists. Both must be older than
the grace period (a fresh object's session may not be visible yet). Pool and system containers are kept:
their owners reconcile them. Other installations' objects, or objects not managed by baaaht, are never
candidates, whatever the listing returned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, Literal, Mapping, Protocol, Sequence, TypeVar

from baaaht.services.containers.ownership import owner_of

SessionVerdict = Literal["open", "closed", "missing"]


class Labelled(Protocol):
    @property
    def labels(self) -> dict[str, str]: ...

    @property
    def created(self) -> float: ...


L = TypeVar("L", bound=Labelled)


@dataclass(frozen=True)
class Removal(Generic[L]):
    target: L
    reason: str


@dataclass
class ReconcilePlan(Generic[L]):
    remove: list[Removal[L]] = field(default_factory=list)
    kept: int = 0
    too_young: int = 0
    foreign: int = 0


def sessions_to_check(objects: Sequence[Labelled], install_id: str, now: float, grace: float) -> set[str]:
    """The session ids whose state decides the fate of some container or volume."""
    found = set()
    for item in objects:
        owner = owner_of(item.labels, install_id)
        if owner.follows_session and owner.session_id and now - item.created >= grace:
            found.add(owner.session_id)
    return found


# The session verdicts that end a container, and a session volume (whose files outlive the close).
CONTAINER_ENDS: tuple[SessionVerdict, ...] = ("closed", "missing")
VOLUME_ENDS: tuple[SessionVerdict, ...] = ("missing",)


def plan(
    objects: Sequence[L],
    install_id: str,
    sessions: Mapping[str, SessionVerdict],
    now: float,
    grace: float,
    ending: tuple[SessionVerdict, ...] = CONTAINER_ENDS,
) -> ReconcilePlan[L]:
    """What to remove: session-owned objects whose session's verdict is in `ending`. `sessions` must hold
    a verdict for every id from `sessions_to_check`; an object whose session has no verdict is kept (when
    in doubt, nothing is removed)."""
    result: ReconcilePlan[L] = ReconcilePlan()
    for item in objects:
        owner = owner_of(item.labels, install_id)
        if not owner.ours:
            result.foreign += 1
            continue
        if not owner.follows_session:
            result.kept += 1  # a pool or system container: its owner decides
            continue
        if now - item.created < grace:
            result.too_young += 1
            continue
        session = owner.session_id
        verdict = sessions.get(session) if session else "missing"
        if verdict in ending:
            if not session:
                why = "it has no session label"
            elif verdict == "closed":
                why = f"session {session} is closed"
            else:
                why = f"session {session} does not exist"
            result.remove.append(Removal(item, why))
        else:
            result.kept += 1
    return result
