"""Sessions that ended while the scheduler was down: their `session.closed` events never reached it.

At start the scheduler asks the session service (a typed peer) about every session its stored open
tasks and schedules belong to; a session that is closed, or gone (deleted), has its tasks cancelled and
its schedules removed, as the event would have done. Until the session service answers (it may start
later), it asks again with a growing pause.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable

from baaaht.bus.background import Stopping
from baaaht.bus.errors import BusError
from baaaht.bus.peers import Calls, Peer
from baaaht.schemas.base import Request
from baaaht.schemas.errors import ErrorCode
from baaaht.schemas.sessions import SessionState

log = logging.getLogger("baaaht.scheduler")

FIRST_PAUSE, LONGEST_PAUSE = 1.0, 60.0  # seconds between attempts while the session service is away


def _about_the_session(error: BusError, request: Request) -> bool:
    """The session service's own answer names the session; anything else means it was not consulted."""
    return error.details.get("session_id") == getattr(request, "session_id", None)


def session_peer(bus: Calls, timeout: float) -> Peer:
    return Peer(bus, "session", timeout=timeout, answered=_about_the_session)


def ended_among(sessions: Peer, session_ids: Iterable[str]) -> list[str]:
    """Those of `session_ids` that are closed or no longer exist (raises UNAVAILABLE while the session
    service cannot be asked)."""
    ended = []
    for session_id in sorted(session_ids):
        try:
            if sessions.get(None, session_id=session_id).state is SessionState.CLOSED:
                ended.append(session_id)
        except BusError as exc:
            if exc.code is not ErrorCode.NOT_FOUND:
                raise
            ended.append(session_id)
    return ended


def catch_up(sessions: Peer, session_ids: set[str], end: Callable[[str], None], stopping: Stopping) -> None:
    """`end(session)` for each of `session_ids` that ended, once the session service has answered
    for all of them (or until stopping)."""
    pause = FIRST_PAUSE
    while session_ids and not stopping.is_set():
        try:
            ended = ended_among(sessions, session_ids)
        except BusError as exc:
            log.info("the session service cannot say which sessions ended", extra={"reason": exc.message})
            stopping.wait(pause)
            pause = min(LONGEST_PAUSE, pause * 2)
            continue
        for session_id in ended:
            log.info("a session ended while the scheduler was down", extra={"session_id": session_id})
            end(session_id)
        return
