"""What a session decides about the containers created for it (pure functions): whether it takes any
more, on whose behalf the policy judges them, and how the session's settings tighten the policy."""

from __future__ import annotations

from typing import Any

from baaaht.bus.errors import precondition
from baaaht.schemas.policy import Principal
from baaaht.schemas.sessions import SessionInfo, SessionState

# The states in which the session service attaches containers; a closing session's close step may
# already have listed its containers, so nothing more is made for it.
OPEN_STATES = frozenset({SessionState.ACTIVE, SessionState.IDLE})


def require_open(session: SessionInfo, what: str = "container") -> None:
    if session.state not in OPEN_STATES:
        raise precondition(
            f"{what} creation refused: session {session.id} is {session.state.value}; {what}s "
            "are created only for active or idle sessions",
            session_id=session.id,
            state=session.state.value,
        )


def principal_for(session: SessionInfo, role: str) -> Principal:
    return Principal(user=session.owner, session_id=session.id, role=role)


def policy_override(session: SessionInfo) -> dict[str, Any]:
    """The session's policy override, with its allowed images as the session's image allow-list
    (`images.allowed`, which the policy engine checks in addition to the host's)."""
    settings = session.settings
    override = settings.policy_override
    if not settings.allowed_images:
        return override
    images = override.get("images") or {}
    # The policy engine keeps one session allow-list per field: dropping either list would loosen
    # what the session asked for, so such a session gets no containers until it is settled.
    if not isinstance(images, dict) or images.get("allowed") not in (None, settings.allowed_images):
        raise precondition(
            f"container creation refused: session {session.id} sets both settings.allowed_images and "
            "settings.policy_override.images.allowed, and the policy engine takes one session image "
            "allow-list",
            session_id=session.id,
            field="settings.allowed_images",
        )
    return {**override, "images": {**images, "allowed": list(settings.allowed_images)}}
