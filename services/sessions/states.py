"""The session state machine: initializing -> active <-> idle -> closing -> closed.

Every way to closed goes through closing, because closing is where the session's containers are
removed. closed is terminal. Staying in the same state is not a transition: callers that only
record activity do not come here.
"""

from __future__ import annotations

from baaaht.bus.errors import precondition
from baaaht.schemas.sessions import SessionState

INITIALIZING, ACTIVE, IDLE, CLOSING, CLOSED = SessionState

TRANSITIONS: dict[SessionState, frozenset[SessionState]] = {
    INITIALIZING: frozenset({ACTIVE, CLOSING}),
    ACTIVE: frozenset({IDLE, CLOSING}),
    IDLE: frozenset({ACTIVE, CLOSING}),
    CLOSING: frozenset({CLOSED}),
    CLOSED: frozenset(),
}

# States in which the session takes part in conversations and owns running containers.
LIVE = frozenset({ACTIVE, IDLE})


def can_move(current: SessionState, target: SessionState) -> bool:
    return target in TRANSITIONS[current]


def move(session_id: str, current: SessionState, target: SessionState, action: str) -> SessionState:
    """Return target, or raise FAILED_PRECONDITION naming both states and what was being attempted."""
    if not can_move(current, target):
        raise precondition(
            f"cannot {action}: session {session_id} cannot go from {current.value} to {target.value}",
            session_id=session_id,
            state=current.value,
            target_state=target.value,
        )
    return target
