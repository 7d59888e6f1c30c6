"""The services the container manager asks before acting: the policy service (before every create) and
the session service (before every create, after it to record the container, and before reconcile removes
anything). Both fail safe: an unreachable policy or session service refuses the create; an unreachable
session service stops reconcile from removing anything."""

from __future__ import annotations

from typing import Any, Protocol

from baaaht.bus.errors import BusError
from baaaht.bus.peers import Calls, Peer
from baaaht.bus.service import CallContext
from baaaht.schemas.base import Request
from baaaht.schemas.bus import BusAgentsUpdate
from baaaht.schemas.containers import ContainerExec, ContainerInfo, ContainerSpec
from baaaht.schemas.errors import ErrorCode
from baaaht.schemas.policy import Decision, Judged, Principal
from baaaht.schemas.sessions import SessionInfo, SessionState
from baaaht.schemas.tasks import TaskState
from baaaht.services.containers.reconcile import SessionVerdict

# Answers from the policy service that are its judgement of the request, passed on as they are;
# anything else means the policy could not be consulted.
POLICY_VERDICT_CODES = (ErrorCode.INVALID_ARGUMENT, ErrorCode.PERMISSION_DENIED, ErrorCode.RESOURCE_EXHAUSTED)
MAX_LISTED_VIOLATIONS = 5


class PolicyGate(Protocol):
    def evaluate(
        self,
        spec: ContainerSpec,
        principal: Principal,
        host_containers: int,
        session_containers: int,
        override: dict[str, Any],
        ctx: CallContext | None = None,
    ) -> tuple[ContainerSpec, list[str]]:
        """The spec to create (the policy's enforced version, under the host policy tightened by the
        session's `override`) and the policy's warnings, a permissive mode's allowances among them;
        raises PERMISSION_DENIED naming the rules, or UNAVAILABLE when the policy service cannot be
        asked (TIMEOUT when the caller's deadline passed meanwhile)."""

    def evaluate_exec(
        self,
        container: ContainerInfo,
        request: ContainerExec,
        principal: Principal,
        ctx: CallContext | None = None,
    ) -> list[str]:
        """The policy's word on running `request` in `container` on behalf of `principal` (audited): its
        warnings when allowed; raises as `evaluate` does."""


class SessionDirectory(Protocol):
    def verdict(self, session_id: str) -> SessionVerdict:
        """open, closed or missing; raises BusError when the session service cannot be asked."""

    def session(self, session_id: str, ctx: CallContext | None = None) -> SessionInfo:
        """The session; raises NOT_FOUND naming it, or UNAVAILABLE when the session service cannot be
        asked."""

    def attach(self, session_id: str, container_id: str, ctx: CallContext | None = None) -> None:
        """Record the container as the session's. The session service's refusal (the session is not
        live, its max_containers is reached, it is gone) is raised as it is; UNAVAILABLE when the
        session service cannot be asked."""


def is_policy_verdict(error: BusError, _request: Request) -> bool:
    return error.code in POLICY_VERDICT_CODES


def is_about_the_session(error: BusError, request: Request) -> bool:
    """The session service's own answers about a session name it; anything else (no instance
    registered, a broker NOT_FOUND for an unknown method, a timeout) means it was not consulted."""
    return error.details.get("session_id") == getattr(request, "session_id", None)


class BusPolicyGate:
    def __init__(self, bus: Calls, timeout: float):
        self.policy = Peer(bus, "policy", timeout=timeout, answered=is_policy_verdict)

    def evaluate(
        self,
        spec: ContainerSpec,
        principal: Principal,
        host_containers: int,
        session_containers: int,
        override: dict[str, Any],
        ctx: CallContext | None = None,
    ) -> tuple[ContainerSpec, list[str]]:
        try:
            decision = self.policy.evaluate(
                ctx,
                spec=spec,
                principal=principal,
                override=override,
                host_containers=host_containers,
                session_containers=session_containers,
            )
        except BusError as exc:
            raise refused_unless_judged(exc, "container creation") from None
        return enforced_or_denied(decision), policy_warnings(decision)

    def evaluate_exec(
        self,
        container: ContainerInfo,
        request: ContainerExec,
        principal: Principal,
        ctx: CallContext | None = None,
    ) -> list[str]:
        try:
            decision = self.policy.evaluate_exec(
                ctx,
                container_id=container.id,
                session_id=container.session_id,
                image=container.image,
                command=request.command,
                working_dir=request.working_dir,
                env_names=sorted(request.env),
                principal=principal,
            )
        except BusError as exc:
            raise refused_unless_judged(exc, "container exec") from None
        if not decision.allowed:
            raise denial(decision, "the command")
        return policy_warnings(decision)


def refused_unless_judged(error: BusError, what: str) -> BusError:
    """The policy's own verdict as it is; any other error refuses `what`, saying why."""
    if error.code in POLICY_VERDICT_CODES:
        return error
    return BusError(error.code, f"{what} refused: {error.message}", error.details)


def policy_warnings(decision: Judged) -> list[str]:
    """What the caller of an allowed create should hear: every rule a permissive policy let pass, and
    the policy's own warnings."""
    allowances = []
    if decision.outcome == "permissive":
        allowances = [
            f"allowed in permissive mode despite {v.rule}: {v.message}" for v in decision.violations
        ]
    return allowances + [f"policy {w.rule}: {w.message}" for w in getattr(decision, "warnings", [])]


def enforced_or_denied(decision: Decision) -> ContainerSpec:
    if decision.allowed:
        return decision.enforced
    raise denial(decision, "the container")


def denial(decision: Judged, what: str) -> BusError:
    """PERMISSION_DENIED naming the rules the policy found broken."""
    rules = sorted({v.rule for v in decision.violations})
    shown = "; ".join(
        f"{v.rule}" + (f" ({v.field})" if v.field else "") + f": {v.message}"
        for v in decision.violations[:MAX_LISTED_VIOLATIONS]
    )
    more = len(decision.violations) - MAX_LISTED_VIOLATIONS
    if more > 0:
        shown += f"; and {more} more"
    return BusError(
        ErrorCode.PERMISSION_DENIED,
        f"policy denied {what}: {shown or decision.outcome}",
        {"rules": rules, "decision_id": decision.decision_id, "policy_version": decision.policy_version},
    )


class BusSessionDirectory:
    def __init__(self, bus: Calls, timeout: float):
        self.sessions = Peer(bus, "session", timeout=timeout, answered=is_about_the_session)

    def verdict(self, session_id: str) -> SessionVerdict:
        try:
            session = self.session(session_id)
        except BusError as exc:
            if exc.code is ErrorCode.NOT_FOUND:
                return "missing"
            raise
        return "closed" if session.state == SessionState.CLOSED else "open"

    def session(self, session_id: str, ctx: CallContext | None = None) -> SessionInfo:
        return self.sessions.get(ctx, session_id=session_id)

    def attach(self, session_id: str, container_id: str, ctx: CallContext | None = None) -> None:
        self.sessions.attach_container(ctx, session_id=session_id, container_id=container_id)


class BusAgentDirectory:
    """The broker's `bus.agents.update`: it re-reads a container's identity for its connections (none any
    more: they are refused and disconnected)."""

    def __init__(self, bus: Calls, timeout: float):
        self.broker = Peer(bus, "bus", timeout=timeout)

    def updated(self, container_id: str) -> None:
        self.broker.call(BusAgentsUpdate(container_id=container_id))


class TaskDirectory(Protocol):
    def queued_sessions(self, queue: str) -> set[str]:
        """The sessions with tasks queued on `queue`; raises BusError when the scheduler cannot be asked."""


class BusTaskDirectory:
    """The scheduler's `task.list`: which sessions wait for a worker."""

    def __init__(self, bus: Calls, timeout: float):
        self.scheduler = Peer(bus, "task", timeout=timeout)

    def queued_sessions(self, queue: str) -> set[str]:
        sessions, cursor = set(), 0
        while True:
            page = self.scheduler.list(
                None, states=[TaskState.QUEUED], queue=queue, limit=1000, cursor=cursor
            )
            sessions.update(task.session_id for task in page.tasks if task.session_id)
            if not page.next_cursor:
                return sessions
            cursor = page.next_cursor
