"""Who owns a container or volume, read from its labels: the one answer to "is this ours, and whose".

The orchestrator labels everything it makes with `baaaht.managed`, its installation (`baaaht.install`)
and an owner kind (`baaaht.owner`): a session's container or volume lives and dies with its session; a
pool container waits for a session without belonging to one; a system container is the host's own. Labels
never change after creation, so the kind is fixed at creation. Reconcile, listing, every operation and the
event feed decide with `owner_of`; a new kind of container is one `OwnerKind` member and its rule in
reconcile.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Mapping

LABEL_MANAGED = "baaaht.managed"
LABEL_INSTALL = "baaaht.install"
LABEL_OWNER = "baaaht.owner"
LABEL_SESSION = "baaaht.session"
LABEL_ROLE = "baaaht.role"
LABEL_AGENT_BUS = "baaaht.agent_bus"  # "true": made with the agents' bus, so it is issued an identity
RESERVED_LABEL_PREFIX = "baaaht."


class OwnerKind(str, enum.Enum):
    SESSION = "session"  # removed by reconcile once its session is closed or gone
    POOL = "pool"  # a warm-pool slot: no session until claimed; the pool keeps and reconciles it
    SYSTEM = "system"  # the host's own (e.g. a proxy): never an orphan
    FOREIGN = "foreign"  # another installation's, or not baaaht's: invisible, never touched


@dataclass(frozen=True)
class Owner:
    kind: OwnerKind
    session_id: str = ""  # for SESSION: "" when the label is missing, which makes it an orphan
    role: str = ""

    @property
    def ours(self) -> bool:
        return self.kind is not OwnerKind.FOREIGN

    @property
    def follows_session(self) -> bool:
        """Whether its session's end is its own end (what reconcile removes orphans by)."""
        return self.kind is OwnerKind.SESSION


FOREIGN = Owner(OwnerKind.FOREIGN)


def install_labels(install_id: str) -> dict[str, str]:
    """The labels everything of this installation carries: an engine-side filter that `owner_of` refines."""
    return {LABEL_MANAGED: "true", LABEL_INSTALL: install_id}


def owner_labels(install_id: str, kind: OwnerKind, session_id: str = "", role: str = "") -> dict[str, str]:
    """The labels that make `owner_of` answer `kind` (with the session for SESSION)."""
    if kind is OwnerKind.FOREIGN:
        raise ValueError("the orchestrator never makes foreign objects")
    labels = {**install_labels(install_id), LABEL_OWNER: kind.value}
    if kind is OwnerKind.SESSION:
        labels[LABEL_SESSION] = session_id
    if role:
        labels[LABEL_ROLE] = role
    return labels


def owner_of(labels: Mapping[str, str], install_id: str) -> Owner:
    if labels.get(LABEL_MANAGED) != "true" or labels.get(LABEL_INSTALL) != install_id:
        return FOREIGN
    # Made before the owner label existed: every container then was a session's.
    declared = labels.get(LABEL_OWNER, OwnerKind.SESSION.value)
    try:
        kind = OwnerKind(declared)
    except ValueError:
        # A kind this version does not know (made by a newer one): not ours to judge, so never touched.
        return FOREIGN
    if kind is OwnerKind.FOREIGN:
        return FOREIGN
    session = labels.get(LABEL_SESSION, "") if kind is OwnerKind.SESSION else ""
    return Owner(kind, session_id=session, role=labels.get(LABEL_ROLE, ""))
