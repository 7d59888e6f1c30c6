"""Who asked, as a service judges it: pure rules on the Caller the broker stamped on the request.

A service never takes who asked from a field of the request. Host callers (a registered `service`, the
`operator`) act for the host, and may act on behalf of another principal (the service records both);
agent callers (`agent`, `assistant`, `worker`) are scoped to the one session their container's
identity names; any other caller (`unidentified`, or a role this version does not know) may do
nothing a service offers (default deny). The broker's table (bus/authorize.py) refuses most of this
before routing; services check again (defence in depth), since a service cannot know which rows the
broker it is behind has.
"""

from __future__ import annotations

import functools
import inspect
from typing import TypeVar

from baaaht.bus.authorize import AGENT_ROLES, OPERATOR, SERVICE, UNIDENTIFIED
from baaaht.bus.authorize import ASSISTANT as ASSISTANT  # re-exported: the roles are authorize's
from baaaht.bus.authorize import WORKER as WORKER
from baaaht.bus.errors import BusError
from baaaht.schemas.bus import Caller
from baaaht.schemas.errors import ErrorCode
from baaaht.schemas.policy import Principal

S = TypeVar("S", bound=type)

HOST_ROLES = frozenset({SERVICE, OPERATOR})


def role_of(caller: Caller) -> str:
    """The role the broker stamped (it stamps every message it routes); none is `unidentified`."""
    return caller.role or UNIDENTIFIED


def is_host(caller: Caller) -> bool:
    return role_of(caller) in HOST_ROLES


def name_of(caller: Caller) -> str:
    """Who the caller is, in words kept in records: `service/<name>`, `operator/uid=<uid>`, or an
    agent's `<role>/<container id>`."""
    role = role_of(caller)
    if role == SERVICE and caller.service:
        return f"{SERVICE}/{caller.service}"
    if role in AGENT_ROLES and caller.container:
        return f"{role}/{caller.container}"
    return f"{role}/uid={caller.uid}"


def principal_of(caller: Caller) -> Principal:
    """The caller itself as a principal: an agent's carries its session and role."""
    role = role_of(caller)
    session = caller.session if role in AGENT_ROLES else ""
    return Principal(user=name_of(caller), session_id=session, role=role)


def denied(message: str, caller: Caller, **details) -> BusError:
    return BusError(
        ErrorCode.PERMISSION_DENIED, message, {"role": role_of(caller), "caller": name_of(caller), **details}
    )


def require_host(caller: Caller, action: str) -> None:
    """PERMISSION_DENIED unless the caller is a host service or the operator."""
    if not is_host(caller):
        raise denied(
            f"{role_of(caller)} callers may not {action} (host services and the operator only)", caller
        )


def require_session(caller: Caller, session_id: str, action: str) -> None:
    """PERMISSION_DENIED unless the caller may `action` session `session_id`: host callers any session,
    agent callers only their own."""
    role = role_of(caller)
    if role in HOST_ROLES:
        return
    if role in AGENT_ROLES and caller.session and session_id == caller.session:
        return
    own = f"session {caller.session}" if role in AGENT_ROLES and caller.session else "no session"
    raise denied(
        f"{role} callers may not {action} session {session_id}: the caller's identity names {own}",
        caller,
        session_id=session_id,
    )


def host_callers_only(cls: S) -> S:
    """Class decorator for a service whose every method is the host's (the container manager, the
    policy): each RPC refuses any caller but a host service or the operator before it does anything."""
    for spec in cls.rpcs().values():
        if not spec.wants_context:
            raise TypeError(f"{cls.__name__}.{spec.method} must take the CallContext to know its caller")
        setattr(cls, spec.method, _for_host(getattr(cls, spec.method), spec.target))
    return cls


def _for_host(method, target: str):
    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def stream(self, req, ctx, *args, **kwargs):
            require_host(ctx.caller, f"call {target}")
            yield from method(self, req, ctx, *args, **kwargs)

        return stream

    @functools.wraps(method)
    def call(self, req, ctx, *args, **kwargs):
        require_host(ctx.caller, f"call {target}")
        return method(self, req, ctx, *args, **kwargs)

    return call
