"""Removing a closing session's containers, through the container manager on the bus.

The container manager is asked for the session's containers (`container.list` by session) and
to destroy each (`container.destroy`, forced: a closing session's work is over); then we wait
for a `container.removed` event for every one, up to `session.close_timeout`. What is still
there afterwards is reported, and the container manager's reconcile removes it later.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Iterable

from baaaht.bus.errors import BusError
from baaaht.bus.peers import Peer
from baaaht.bus.service import CallContext
from baaaht.schemas.errors import ErrorCode

log = logging.getLogger("baaaht.session.reaper")

RETRY_INTERVAL = 0.5  # between attempts while the container manager is unavailable (e.g. restarting)


class ContainerReaper:
    def __init__(self, timeout: float, stopping: threading.Event, containers: Peer):
        self.timeout = timeout
        self.stopping = stopping
        self.containers = containers
        self._changed = threading.Condition()
        self._watches: list[set[str]] = []  # ids removed since each running removal started

    def removed(self, container_id: str) -> None:
        """Called for every `container.removed` event."""
        with self._changed:
            for seen in self._watches:
                seen.add(container_id)
            self._changed.notify_all()

    def wake(self) -> None:
        """Make waiting removals look at `stopping` now."""
        with self._changed:
            self._changed.notify_all()

    def remove_all(self, session_id: str, known: Iterable[str]) -> list[str]:
        """Destroy every container of the session (those the container manager lists plus those
        `known` to the session); return the ids not confirmed removed within the timeout."""
        deadline = time.monotonic() + self.timeout
        seen: set[str] = set()
        with self._changed:
            # Watch before listing, so a removal that happens meanwhile is not missed.
            self._watches.append(seen)
        try:
            listed = self._listed(session_id, deadline)
            pending = set(known) | (listed or set())
            for container_id in sorted(pending):
                if self._destroy(container_id, deadline):
                    seen.add(container_id)
            with self._changed:
                self._changed.wait_for(
                    lambda: pending <= seen or self.stopping.is_set(),
                    timeout=max(0.0, deadline - time.monotonic()),
                )
                remaining = pending - seen
        finally:
            with self._changed:
                self._watches.remove(seen)
        if remaining:
            # An event may have been lost or not yet arrived: ask once more what is really left.
            still_listed = self._listed(session_id, time.monotonic() + RETRY_INTERVAL)
            if still_listed is not None:
                remaining &= still_listed
        if remaining:
            log.warning(
                "containers of a closed session not confirmed removed",
                extra={"session_id": session_id, "containers": sorted(remaining)},
            )
        return sorted(remaining)

    def _listed(self, session_id: str, deadline: float) -> set[str] | None:
        """The container ids the container manager has for the session; None if it never answered."""
        while True:
            try:
                reply = self.containers.list(self._within(deadline), session_id=session_id)
                return {container.id for container in reply.containers}
            except BusError as exc:
                if not self._retry(exc, deadline):
                    log.warning(
                        "cannot list a session's containers",
                        extra={"session_id": session_id, "error": str(exc)},
                    )
                    return None

    def _destroy(self, container_id: str, deadline: float) -> bool:
        """Ask for removal; True if the container is known to be gone already."""
        while True:
            try:
                # With its anonymous volumes (an image's VOLUME): unlabelled, nothing else would find them.
                # The engine never removes a named volume with a container; session volumes stay.
                self.containers.destroy(
                    self._within(deadline), id=container_id, force=True, remove_volumes=True
                )
                return False
            except BusError as exc:
                if exc.code is ErrorCode.NOT_FOUND:
                    return True
                if not self._retry(exc, deadline):
                    log.warning(
                        "cannot destroy a container", extra={"container_id": container_id, "error": str(exc)}
                    )
                    return False

    def _retry(self, exc: BusError, deadline: float) -> bool:
        """Wait and say True if the failure is passing and there is time left."""
        if exc.code is not ErrorCode.UNAVAILABLE:
            return False
        pause = min(RETRY_INTERVAL, deadline - time.monotonic())
        return pause > 0 and not self.stopping.wait(pause)

    @staticmethod
    def _within(deadline: float) -> CallContext:
        """A call bounded by the removal's (monotonic) deadline, given at least a moment."""
        return CallContext(deadline=time.time() + max(0.1, deadline - time.monotonic()))
