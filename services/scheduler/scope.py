"""Which tasks a caller may touch, from the broker's stamp alone (never from a request field).

The host (a registered service, or the operator on the services socket) reaches every session. An
assistant submits, reads and cancels only in its own session; a worker (agent) takes, reports and
reads only its own session's tasks. Anyone else is refused, whatever the roles table let through.
"""

from __future__ import annotations

from typing import Literal

from baaaht.bus import authorize
from baaaht.bus.errors import BusError
from baaaht.schemas.bus import Caller
from baaaht.schemas.errors import ErrorCode

ASSISTANT = "assistant"
WORKER = "worker"
HOST_ROLES = frozenset({authorize.SERVICE, authorize.OPERATOR})

Action = Literal["submit", "read", "work"]
SESSION_ROLES: dict[str, frozenset[str]] = {
    ASSISTANT: frozenset({"submit", "read"}),
    WORKER: frozenset({"work", "read"}),
}


def scope_of(caller: Caller, action: Action) -> str | None:
    """None: every session (the host); else the one session the caller may act in."""
    if caller.role in HOST_ROLES or (not caller.role and caller.socket == "services"):
        return None  # an empty role: a stamp from a broker before roles, on the host's own socket
    if action in SESSION_ROLES.get(caller.role, ()) and caller.session:
        return caller.session
    raise BusError(
        ErrorCode.PERMISSION_DENIED,
        f"a {caller.role or 'peer'} caller may not {action} tasks"
        + ("" if caller.session or caller.role not in SESSION_ROLES else " (its identity names no session)"),
    )


def session_for(caller: Caller, asked: str, action: Action) -> str:
    """The session a new task or schedule goes into: the asked one for the host, the caller's own else."""
    scope = scope_of(caller, action)
    if scope is None:
        return asked
    if asked and asked != scope:
        raise BusError(
            ErrorCode.PERMISSION_DENIED,
            f"a {caller.role} of session {scope} may not submit into session {asked}",
        )
    return scope
