"""Which tasks a caller may touch, from the broker's stamp alone (never from a request field).

Host callers (a registered service, the operator) reach every session. An assistant submits, reads and
cancels only in its own session; a worker (agent) takes, reports and reads only its own session's
tasks. Anyone else is refused, whatever rows the broker's table has (bus/callers.py: defence in depth).
"""

from __future__ import annotations

from typing import Literal

from baaaht.bus.callers import ASSISTANT, HOST_ROLES, WORKER, denied, role_of
from baaaht.schemas.bus import Caller
from baaaht.schemas.tools import TOOLS_QUEUE

Action = Literal["submit", "read", "work"]
# The queues an agent role may submit into: an assistant delegates tool calls to its session's worker, and
# nothing else on the host serves a session's queue.
SUBMIT_QUEUES: dict[str, frozenset[str]] = {ASSISTANT: frozenset({TOOLS_QUEUE})}
SESSION_ROLES: dict[str, frozenset[str]] = {
    ASSISTANT: frozenset({"submit", "read"}),
    WORKER: frozenset({"work", "read"}),
}


def scope_of(caller: Caller, action: Action) -> str | None:
    """None: every session (a host caller); else the one session the caller may act in."""
    role = role_of(caller)
    if role in HOST_ROLES:
        return None
    if action in SESSION_ROLES.get(role, ()) and caller.session:
        return caller.session
    why = " (its identity names no session)" if role in SESSION_ROLES and not caller.session else ""
    raise denied(f"{role} callers may not {action} tasks{why}", caller)


def session_for(caller: Caller, asked: str, action: Action) -> str:
    """The session a new task or schedule goes into: the asked one for a host caller, the caller's own
    for an assistant (asking for another is refused)."""
    scope = scope_of(caller, action)
    if scope is None:
        return asked
    if asked and asked != scope:
        raise denied(
            f"{role_of(caller)} callers of session {scope} may not submit into session {asked}", caller
        )
    return scope


def check_submit_queue(caller: Caller, queue: str) -> None:
    """Refuse an agent's submit into a queue its role does not delegate to (host callers: any queue)."""
    role = role_of(caller)
    if role in HOST_ROLES or queue in SUBMIT_QUEUES.get(role, ()):
        return
    allowed = ", ".join(sorted(SUBMIT_QUEUES.get(role, ()))) or "none"
    raise denied(f"{role} callers may not submit into queue {queue!r} (allowed: {allowed})", caller)
