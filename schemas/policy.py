"""Policy engine messages (`policy.*`): decisions on container specs, the policy itself, the audit log.

Policy documents and session overrides travel as plain data (`dict`): they are config-like
documents that the policy service validates strictly (unknown keys refused with their field
path), which bus messages must never do.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

import msgspec

from baaaht.schemas.base import Event, Request, Response
from baaaht.schemas.bus import Caller
from baaaht.schemas.containers import ContainerSpec
from baaaht.schemas.ids import ContainerId

# allow: no violation. deny: strict mode found a violation. permissive: allowed although a rule was
# violated (audit mode). disabled: the policy is switched off, nothing was checked.
Outcome = Literal["allow", "deny", "permissive", "disabled"]
CheckOutcome = Literal["pass", "violation", "warning", "enforce"]


class Principal(msgspec.Struct, kw_only=True, omit_defaults=True):
    """On whose behalf a container is created."""

    user: str = ""
    groups: list[str] = []
    session_id: str = ""
    role: str = ""


class Violation(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One broken rule: `rule` is a stable id such as `quota.memory.max` or `security.root`."""

    rule: str
    message: str
    field: str = ""  # where in the container spec, e.g. `mounts[0].source`
    value: str = ""  # the offending value, as text
    limit: str = ""  # what the policy allows, as text


class Check(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One step of a decision, for `policy.explain`."""

    rule: str
    outcome: CheckOutcome
    message: str


class FieldError(msgspec.Struct, kw_only=True):
    """A problem in a policy document, at a dotted field path such as `mounts.allowlist[2].path`."""

    path: str
    message: str


class Judged(Response, kw_only=True):
    """What every decision of the policy says (audited under `decision_id`)."""

    decision_id: str
    allowed: bool
    outcome: Outcome
    mode: str
    policy_version: str
    violations: list[Violation] = []


class Decision(Judged, kw_only=True):
    warnings: list[Violation] = []
    enforced: ContainerSpec  # the spec to create: defaults filled in, mounts downgraded, caps dropped


class PolicyEvaluate(Request, tag="policy.evaluate", kw_only=True):
    """Judge a container spec before it is created. Every call is written to the audit log, with who
    asked (the caller as the broker stamped it) and `principal`, on whose behalf (the caller itself when
    empty). Host services and the operator only."""

    response: ClassVar[type] = Decision

    spec: ContainerSpec
    principal: Principal = msgspec.field(default_factory=Principal)
    # The session's policy override (a partial policy document); it can only tighten.
    override: dict[str, Any] = {}
    # Containers already running on the host and in the session; None when the caller does not know.
    host_containers: int | None = None
    session_containers: int | None = None
    action: str = "container.create"


class ExecDecision(Judged, kw_only=True):
    """The policy's judgement of a command to run in a container (`container.exec`)."""


class PolicyEvaluateExec(Request, tag="policy.evaluate_exec", kw_only=True):
    """Judge a command before the container manager runs it in a container: a principal with a session
    may exec only in that session's containers. Audited like `policy.evaluate` (the command by its
    digest, the environment by its names). Host services and the operator only."""

    response: ClassVar[type] = ExecDecision

    container_id: ContainerId
    session_id: str = ""  # the container's session; empty for a pool or system container
    image: str = ""
    command: list[str]
    working_dir: str = ""
    env_names: list[str] = []
    principal: Principal = msgspec.field(default_factory=Principal)  # empty: the caller itself


class Explanation(Response, kw_only=True):
    decision: Decision
    checks: list[Check]
    summary: str  # one sentence naming the rule that decided


class PolicyExplain(Request, tag="policy.explain", kw_only=True):
    """The same judgement as `policy.evaluate`, with every step, for people. Not audited."""

    response: ClassVar[type] = Explanation

    spec: ContainerSpec
    principal: Principal = msgspec.field(default_factory=Principal)
    override: dict[str, Any] = {}
    host_containers: int | None = None
    session_containers: int | None = None


class LastReload(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The latest attempt to load the policy document (at start, on SIGHUP, `policy.reload` or a file
    change). A refused document leaves the policy before it in force; `error` says why."""

    ok: bool
    time: float
    source: str
    version: str = ""  # the version in force after the attempt
    error: str = ""
    errors: list[FieldError] = []


class PolicyInfo(Response, kw_only=True):
    version: str
    source: str  # the policy file's path, or `built-in`
    mode: str
    loaded_at: float
    document: dict[str, Any]  # the effective policy, sizes written as `512MB`
    # With an override: the session's own allow-lists, checked in addition to the host's.
    narrowing: dict[str, Any] = {}
    refused: list[FieldError] = []  # override fields that would have loosened the policy
    last_reload: LastReload | None = None


class PolicyGet(Request, tag="policy.get", kw_only=True):
    response: ClassVar[type] = PolicyInfo

    override: dict[str, Any] = {}


class ReloadResult(Response, kw_only=True):
    version: str
    previous_version: str
    changed: bool
    source: str


class PolicyReload(Request, tag="policy.reload", kw_only=True):
    """Read the policy file again now; a bad file is refused and the current policy stays."""

    response: ClassVar[type] = ReloadResult


class ValidationResult(Response, kw_only=True):
    valid: bool
    errors: list[FieldError] = []
    warnings: list[FieldError] = []
    version: str = ""  # the version the document would have once loaded


class PolicyValidate(Request, tag="policy.validate", kw_only=True):
    """Check a policy document (YAML or JSON text) without loading it. With `as_override`,
    check it as a session override of the current policy: anything that would loosen it is an error."""

    response: ClassVar[type] = ValidationResult

    text: str
    as_override: bool = False


# -- the audit log: its line format (a file only the policy service reads) and the RPCs that read it --


class AuditRecord(msgspec.Struct, kw_only=True):
    """One line of the audit log. `hash` covers the whole line (with `hash` emptied), and `prev`
    is the previous line's hash, so an edited, removed or reordered line breaks the chain."""

    seq: int
    time: float
    decision_id: str
    action: str  # container.create | container.exec | policy.reload
    decision: str  # an Outcome, or applied | refused for a reload
    principal: Principal = msgspec.field(default_factory=Principal)  # on whose behalf
    asked_by: Caller = msgspec.field(default_factory=Caller)  # who asked, as the broker stamped the caller
    resource: str = ""  # sha256 of the judged spec (or command) with environment values left out
    container_id: str = ""  # container.exec: the container the command was to run in
    image: str = ""
    env_names: list[str] = []  # names only: a value never enters the log
    rules: list[str] = []
    policy_version: str = ""
    prev: str = ""
    hash: str = ""  # last, so the line can be hashed with it emptied


class AuditProblem(msgspec.Struct, kw_only=True):
    line: int  # 1-based line number; 0 for the log as a whole
    message: str


class AuditReport(Response, kw_only=True):
    path: str  # the log on the host
    ok: bool  # intact: every line sealed and linked, nothing removed from the end
    records: int
    last_hash: str = ""
    first_bad_line: int = 0  # the first line with a problem; 0 when none is (or only the log as a whole)
    problems: list[AuditProblem] = []
    warnings: list[AuditProblem] = []


class PolicyAuditVerify(Request, tag="policy.audit_verify", kw_only=True):
    """Check the host's audit log (hash chain and head file). NOT_FOUND when there is no log."""

    response: ClassVar[type] = AuditReport


class AuditRecords(Response, kw_only=True):
    """Records of the host's audit log, oldest first (one batch of the `policy.audit_tail` stream)."""

    path: str
    records: list[AuditRecord] = []


MAX_AUDIT_TAIL = 10_000


class PolicyAuditTail(Request, tag="policy.audit_tail", kw_only=True):
    """The last `limit` records after record `since`; with `follow`, then each new record as it is
    written until the caller cancels or the deadline passes. Streams AuditRecords; NOT_FOUND when
    there is no log."""

    response: ClassVar[type] = AuditRecords

    limit: Annotated[int, msgspec.Meta(ge=0, le=MAX_AUDIT_TAIL)] = 20
    since: Annotated[int, msgspec.Meta(ge=0)] = 0  # a record's seq
    follow: bool = False


class PolicyReloaded(Event, tag="policy.reloaded", kw_only=True):
    version: str
    previous_version: str
    source: str


class PolicyReloadFailed(Event, tag="policy.reload_failed", kw_only=True):
    source: str
    error: str
    errors: list[FieldError] = []


class PolicyViolation(Event, tag="policy.violation", kw_only=True):
    """Published for every denial and every violation let through in permissive mode."""

    decision_id: str
    outcome: Outcome
    principal: Principal
    image: str
    asked_by: Caller = msgspec.field(default_factory=Caller)
    rules: list[str]
    violations: list[Violation]
    policy_version: str
