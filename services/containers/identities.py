"""The identities of this installation's agent containers: issued before a container can run, revoked
as soon as it stops, dies, is removed or its session closes (common/identity.py has the record and the
store; the broker reads it when an agent connects).

The container manager is the only writer. Each change is followed by telling the broker
(`bus.agents.update`), which re-reads the identity for that container's connections: no identity any
more, and they are refused and disconnected. What a container is comes from its labels (ownership.py),
which never change, so a restarted container manager re-issues the identities of the agent containers it
keeps and removes those of containers that are gone (`settle`).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Iterable, Mapping, Protocol

from baaaht.bus.callers import AGENT_ROLES
from baaaht.bus.errors import BusError
from baaaht.common.identity import AgentIdentity, IdentityStore
from baaaht.services.containers.ownership import LABEL_AGENT_BUS, owner_of
from baaaht.services.containers.reconcile import SessionVerdict

log = logging.getLogger("baaaht.containers")


class AgentDirectory(Protocol):
    """The broker, as far as identities go."""

    def updated(self, container_id: str) -> None:
        """The container's identity was written or removed: its connections must be judged anew."""


def agent_role(labels: Mapping[str, str], install_id: str) -> str:
    """The identity role of one of this installation's session containers with the agent bus, else ""
    (pool containers get theirs when claimed; system containers and containers without the bus none)."""
    owner = owner_of(labels, install_id)
    if not owner.follows_session or not owner.session_id or labels.get(LABEL_AGENT_BUS) != "true":
        return ""
    return owner.role if owner.role in AGENT_ROLES else ""


class Identities:
    def __init__(
        self,
        store: IdentityStore,
        install_id: str,
        broker: AgentDirectory,
        clock: Callable[[], float] = time.time,
    ):
        self.store = store
        self.install_id = install_id
        self.broker = broker
        self.clock = clock
        self._untold: set[str] = set()  # changes the broker could not be told of yet
        self._untold_lock = threading.Lock()

    def issue(self, container_id: str, session_id: str, role: str) -> None:
        self.store.put(
            AgentIdentity(
                container_id=container_id,
                session_id=session_id,
                role=role,
                install_id=self.install_id,
                issued_at=self.clock(),
            )
        )
        self._tell(container_id)

    def revoke(self, container_id: str) -> bool:
        """True when there was an identity to revoke (and the broker was told, or will be)."""
        if not self.store.remove(container_id):
            return False
        log.info("agent identity revoked", extra={"container": container_id})
        self._tell(container_id)
        return True

    def revoke_session(self, session_id: str) -> list[str]:
        """Revoke every identity of the session's containers; their ids."""
        revoked = [i.container_id for i in self._ours() if i.session_id == session_id]
        for container_id in revoked:
            self.revoke(container_id)
        return revoked

    def settle(
        self, live: Iterable[tuple[str, Mapping[str, str]]], verdicts: Mapping[str, SessionVerdict]
    ) -> None:
        """After a reconcile: `live` are (id, labels) of this installation's containers that may run,
        `verdicts` what the session service said of their sessions. An agent container of an open session
        has its identity (re-)issued; one whose session has no verdict (too young to judge) keeps what it
        has; every other identity of this installation is revoked (its container is gone, has ended, or
        its session is)."""
        entitled: dict[str, tuple[str, str]] = {}
        unjudged: set[str] = set()
        for container_id, labels in live:
            role = agent_role(labels, self.install_id)
            session = owner_of(labels, self.install_id).session_id
            verdict = verdicts.get(session)
            if role and verdict == "open":
                entitled[container_id] = (session, role)
            elif role and verdict is None:
                unjudged.add(container_id)
        for identity in self._ours():
            if identity.container_id not in entitled and identity.container_id not in unjudged:
                self.revoke(identity.container_id)
        for container_id, (session, role) in entitled.items():
            current = self.store.get(container_id)
            if current is None or (current.session_id, current.role) != (session, role):
                self.issue(container_id, session, role)

    def _ours(self) -> list[AgentIdentity]:
        return [i for i in self.store.all() if i.install_id == self.install_id]

    def tell_untold(self) -> None:
        """Tell the broker what it could not be told before (background work retries this)."""
        with self._untold_lock:
            untold = sorted(self._untold)
        for container_id in untold:
            self._tell(container_id)

    def _tell(self, container_id: str) -> None:
        try:
            self.broker.updated(container_id)
        except BusError as exc:
            # New connections read the file anyway; the ones it already judged wait for the retry.
            with self._untold_lock:
                first = container_id not in self._untold
                self._untold.add(container_id)
            if first:
                log.warning(
                    "the broker was not told of an identity change (retried)",
                    extra={"container": container_id, "error": exc.message},
                )
            return
        with self._untold_lock:
            self._untold.discard(container_id)
