"""The policy service: `policy.*` on the bus, hot reload, audit of every decision.

The policy in force is one immutable LoadedPolicy behind one reference: a reload parses and
checks a whole new document first and then swaps the reference, so a request sees either the old
policy or the new one, never a mix. A document that fails its checks is refused and the old policy
stays. Reloads happen on SIGHUP, on `policy.reload`, and when the file changes (polled).

Fail closed: without a valid policy, or without a writable audit log, `policy.evaluate` answers
UNAVAILABLE (so the container manager refuses to create) and the service reports itself unhealthy.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol

import msgspec

from baaaht.bus.background import background
from baaaht.bus.callers import host_callers_only, principal_of
from baaaht.bus.client import BusClient
from baaaht.bus.errors import BusError, invalid, not_found, precondition, unavailable
from baaaht.bus.service import CallContext, Publisher, Service, rpc
from baaaht.common.endpoints import Endpoints
from baaaht.common.policy import document
from baaaht.schemas.config import Config
from baaaht.schemas.containers import ContainerSpec
from baaaht.schemas.policy import (
    AuditRecord,
    AuditRecords,
    AuditReport,
    Decision,
    ExecDecision,
    Explanation,
    FieldError,
    Judged,
    LastReload,
    PolicyAuditTail,
    PolicyAuditVerify,
    PolicyEvaluate,
    PolicyEvaluateExec,
    PolicyExplain,
    PolicyGet,
    PolicyInfo,
    PolicyReload,
    PolicyReloaded,
    PolicyReloadFailed,
    PolicyValidate,
    PolicyViolation,
    Principal,
    ReloadResult,
    ValidationResult,
    Violation,
)
from baaaht.services.policy import audit, engine, overrides
from baaaht.services.policy.mounts import HostPaths

log = logging.getLogger("baaaht.policy")

CONFIG_DIR = "/etc/baaaht"
DOCKER_SOCKETS = ("/var/run/docker.sock", "/run/docker.sock")
# The engines' default data roots: every container's files and configuration (its environment too) and
# every named volume, other sessions' included.
ENGINE_DATA_ROOTS = ("/var/lib/docker", "/var/lib/containerd")
REFUSED_RULE = "policy.override.refused"
AUDIT_FOLLOW_POLL = 0.5  # seconds between looks at the audit log for `policy.audit_tail` followers
AUDIT_BATCH = 500  # records per streamed batch, far below the bus's message size limit

_spec_encoder = msgspec.json.Encoder()


class PolicySource(Protocol):
    """Where the policy document comes from: the file, in production."""

    description: str

    def fingerprint(self) -> object:
        """Changes whenever the document may have changed; None when there is no document."""

    def read(self) -> str | None:
        """The document's text, or None when there is none (the built-in policy applies)."""


class PolicyFile:
    def __init__(self, path: str):
        self.path = path
        self.description = path or "built-in (no policy.path configured)"

    def fingerprint(self) -> object:
        if not self.path:
            return None
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return None
        except OSError as error:  # unreadable: `read` will say why
            return "unreadable", error.errno
        return stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns

    def read(self) -> str | None:
        if not self.path:
            return None
        try:
            return Path(self.path).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None


def host_paths_for(config: Config) -> HostPaths:
    """The orchestrator's own files, which no container may see, and the agent bus directory."""
    endpoints = Endpoints.for_config(config.bus)
    protected = [config.data_dir, endpoints.run_dir, CONFIG_DIR, *DOCKER_SOCKETS, *ENGINE_DATA_ROOTS]
    if config.docker.host.startswith("unix://"):
        protected.append(config.docker.host[len("unix://") :])
    docker = config.docker
    protected += [
        path for path in (config.policy.path, docker.tls_ca_cert, docker.tls_cert, docker.tls_key) if path
    ]
    return HostPaths(
        protected=tuple(dict.fromkeys(os.path.abspath(path) for path in protected)),
        system_mounts=(endpoints.agent_dir,),
    )


def resource_digest(spec: ContainerSpec) -> str:
    """What was judged, without the environment's values (which may be secrets)."""
    redacted = msgspec.structs.replace(spec, env={name: "" for name in spec.env})
    return "sha256:" + hashlib.sha256(_spec_encoder.encode(redacted)).hexdigest()


def command_digest(request: PolicyEvaluateExec) -> str:
    """The command judged, by digest: its arguments may hold secrets too."""
    judged = [request.container_id, request.working_dir, *request.command]
    return "sha256:" + hashlib.sha256(_spec_encoder.encode(judged)).hexdigest()


def on_behalf_of(named: Principal, ctx: CallContext) -> Principal:
    """The principal a (host) caller names, or the caller itself when it names none. Who asked is always
    the stamped caller, and the audit record keeps both."""
    return principal_of(ctx.caller) if named == Principal() else named


@dataclass(frozen=True)
class Loading:
    """What one attempt to load the document did: `policy` is the one in force afterwards."""

    previous: document.LoadedPolicy | None
    policy: document.LoadedPolicy | None
    source: str
    error: document.DocumentError | None


@host_callers_only  # agents never read, reload or ask the policy (the broker refuses them first)
class PolicyService(Service):
    name = "policy"
    # Audit followers each hold a handler for their whole life; decisions must still find one free.
    concurrency = 32

    def __init__(
        self,
        source: PolicySource,
        audit_path: str | Path,
        defaults: document.HostDefaults,
        host_paths: HostPaths,
        *,
        events: Publisher,
        reload_interval: float = 2.0,
    ):
        self.events = events
        self.source = source
        self.audit_path = Path(audit_path)
        self.defaults = defaults
        self.host_paths = host_paths
        self.reload_interval = reload_interval
        self._policy: document.LoadedPolicy | None = None
        self._load_problem = ""
        self._last_reload: LastReload | None = None
        self._fingerprint: object = object()  # matches nothing: the first check loads
        self._reload_lock = threading.Lock()
        self._audit: audit.AuditLog | None = None
        self._audit_problem = ""
        self._audit_lock = threading.Lock()

    @classmethod
    def from_config(cls, config: Config, bus: BusClient) -> "PolicyService":
        return cls(
            source=PolicyFile(config.policy.path),
            audit_path=audit.log_path(config.data_dir),
            defaults=document.HostDefaults.for_config(config),
            host_paths=host_paths_for(config),
            events=bus,
            reload_interval=float(config.policy.reload_interval),
        )

    # -- life cycle ---------------------------------------------------------------------------

    def on_start(self) -> None:
        """Open the audit log and load the policy: the runner reports the service healthy only after."""
        self._open_audit_quietly()
        with self._reload_lock:
            self._announce(self._swap(force=True))

    def on_reload(self) -> None:
        self.reload_quietly(force=True)

    @background(every=lambda self: self.reload_interval)
    def watch_file(self) -> None:
        self.reload_quietly(force=False)

    def on_stop(self) -> None:
        with self._audit_lock:
            if self._audit is not None:
                self._audit.close()
                self._audit = None

    def health_report(self) -> tuple[bool, str]:
        """Asked at every heartbeat. An unhealthy service gets no requests, so this is also where an
        audit log that was moved aside, or a disk that has room again, is found usable again."""
        if self._audit_problem:
            self._open_audit_quietly()
        if self._policy is None:
            return False, self._load_problem
        if self._audit_problem:
            return False, self._audit_problem
        return True, ""

    # -- loading ------------------------------------------------------------------------------

    def reload_quietly(self, force: bool) -> None:
        """Reload, reporting problems through events and health rather than raising."""
        try:
            self._reload(force)
        except document.DocumentError:
            pass  # published as policy.reload_failed; the old policy stays
        except Exception:
            log.exception("policy reload failed")

    def _reload(self, force: bool) -> ReloadResult | None:
        """Load the document if it changed (or when forced) and swap it in; None when unchanged.
        Raises DocumentError (after announcing it) when the document is refused."""
        with self._reload_lock:
            loading = self._swap(force)
            if loading is None:
                return None
            self._announce(loading)
        if loading.error is not None:
            raise loading.error
        previous_version = loading.previous.version if loading.previous else ""
        return ReloadResult(
            version=loading.policy.version,
            previous_version=previous_version,
            changed=loading.policy.version != previous_version,
            source=loading.source,
        )

    def _swap(self, force: bool) -> Loading | None:
        """Read and check the document; swap it in when valid, and keep what happened for
        `policy.get`. Call under the reload lock (or before the service is shared)."""
        loading = self._load(force)
        if loading is not None:
            self._last_reload = LastReload(
                ok=loading.error is None,
                time=time.time(),
                source=loading.source,
                version=loading.policy.version if loading.policy else "",
                error=str(loading.error) if loading.error else "",
                errors=loading.error.errors if loading.error else [],
            )
        return loading

    def _load(self, force: bool) -> Loading | None:
        """The document read and checked (None when unchanged); swapped in when valid."""
        fingerprint = self.source.fingerprint()
        if not force and fingerprint == self._fingerprint:
            return None
        self._fingerprint = fingerprint  # a bad file is not retried until it changes again
        previous = self._policy
        source = self.source.description
        try:
            text = self.source.read()
            if text is None:
                source = document.BUILTIN_SOURCE
                loaded = document.builtin(self.defaults)
            else:
                loaded = document.load(document.parse_text(text), self.defaults)
        except (OSError, UnicodeDecodeError) as error:
            # An unreadable file is refused like an invalid one: never mistaken for a missing one.
            unreadable = document.DocumentError([FieldError(path="", message=f"cannot be read: {error}")])
            return self._refused(previous, source, unreadable)
        except document.DocumentError as error:
            return self._refused(previous, source, error)
        self._policy = policy = document.LoadedPolicy.of(loaded, source, time.time())
        self._load_problem = ""
        return Loading(previous, policy, source, None)

    def _refused(
        self, previous: document.LoadedPolicy | None, source: str, error: document.DocumentError
    ) -> Loading:
        self._load_problem = f"policy {source} is invalid: {error}"
        return Loading(previous, previous, source, error)

    def _announce(self, loading: Loading) -> None:
        """Log, audit and publish what a load did."""
        if loading.error is not None:
            log.error("policy refused", extra={"source": loading.source, "error": str(loading.error)})
            self._audit_reload("refused", loading.previous.version if loading.previous else "")
            self.events.publish(
                PolicyReloadFailed(
                    source=loading.source, error=str(loading.error), errors=loading.error.errors
                )
            )
            return
        previous_version = loading.previous.version if loading.previous else ""
        if loading.policy.version == previous_version:
            return
        log.info("policy loaded", extra={"source": loading.source, "version": loading.policy.version})
        self._audit_reload("applied", loading.policy.version)
        self.events.publish(
            PolicyReloaded(
                version=loading.policy.version, previous_version=previous_version, source=loading.source
            )
        )

    def _current(self) -> document.LoadedPolicy:
        policy = self._policy  # read once: a reload may swap it at any moment
        if policy is None:
            raise unavailable(f"no policy in force: {self._load_problem}")
        return policy

    def _effective(self, override: dict) -> tuple[overrides.EffectivePolicy, list[FieldError]]:
        try:
            return overrides.tighten(self._current(), override)
        except document.DocumentError as error:
            raise invalid(
                f"invalid session override: {error}", errors=msgspec.to_builtins(error.errors)
            ) from None

    # -- audit --------------------------------------------------------------------------------

    def _open_audit_quietly(self) -> None:
        try:
            self._open_audit()
        except BusError:
            pass  # reported by health(); every request tries again, so moving a bad log aside heals it

    def _open_audit(self) -> audit.AuditLog:
        with self._audit_lock:
            if self._audit is None:
                try:
                    self._audit = audit.AuditLog(self.audit_path)
                except (audit.AuditError, OSError) as error:
                    problem = f"audit log unusable: {error}"
                    if problem != self._audit_problem:  # health() retries at every heartbeat
                        log.error(
                            "audit log unusable", extra={"path": str(self.audit_path), "error": str(error)}
                        )
                    self._audit_problem = problem
                    raise unavailable(
                        f"{self._audit_problem}; no decision is made without a record"
                    ) from None
                self._audit_problem = ""
            return self._audit

    def _record(self, record: AuditRecord) -> AuditRecord:
        log_file = self._open_audit()
        try:
            return log_file.append(record)
        except OSError as error:
            self._audit_problem = f"audit log unwritable: {error}"
            with self._audit_lock:
                if self._audit is log_file:  # reopened (and its end checked again) once health() retries
                    log_file.close()
                    self._audit = None
            raise unavailable(f"{self._audit_problem}; no decision is made without a record") from None

    def _audit_reload(self, outcome: str, version: str) -> None:
        try:
            self._record(
                AuditRecord(
                    seq=0,
                    time=time.time(),
                    decision_id=uuid.uuid4().hex,
                    action="policy.reload",
                    decision=outcome,
                    resource=self.source.description,
                    policy_version=version,
                )
            )
        except Exception as error:  # a reload is not refused for want of its audit line
            log.error("reload not audited", extra={"error": str(error)})

    # -- rpcs ---------------------------------------------------------------------------------

    def _judge(
        self, request: PolicyEvaluate | PolicyExplain
    ) -> tuple[overrides.EffectivePolicy, engine.Judgement]:
        policy, refused = self._effective(request.override)
        counts = engine.Counts(host=request.host_containers, session=request.session_containers)
        judgement = engine.evaluate(request.spec, request.principal, policy, self.host_paths, counts)
        refusals = [
            Violation(
                rule=REFUSED_RULE, message=f"session override {error.path}: {error.message}", field=error.path
            )
            for error in refused
        ]
        judgement.warnings[:0] = refusals
        return policy, judgement

    @staticmethod
    def _decision(
        decision_id: str, policy: overrides.EffectivePolicy, judgement: engine.Judgement
    ) -> Decision:
        return Decision(
            decision_id=decision_id,
            allowed=judgement.allowed,
            outcome=judgement.outcome,
            mode=policy.document.mode,
            policy_version=policy.version,
            violations=judgement.violations,
            warnings=judgement.warnings,
            enforced=judgement.enforced,
        )

    @rpc
    def evaluate(self, request: PolicyEvaluate, ctx: CallContext) -> Decision:
        request = msgspec.structs.replace(request, principal=on_behalf_of(request.principal, ctx))
        policy, judgement = self._judge(request)
        decision = self._decision(uuid.uuid4().hex, policy, judgement)
        self._audit_decision(
            ctx,
            decision,
            request.action,
            request.principal,
            resource=resource_digest(request.spec),
            image=request.spec.image,
            env_names=sorted(request.spec.env),
        )
        return decision

    @rpc
    def evaluate_exec(self, request: PolicyEvaluateExec, ctx: CallContext) -> ExecDecision:
        principal = on_behalf_of(request.principal, ctx)
        policy, _refused = self._effective({})
        judgement = engine.evaluate_exec(request.session_id, principal, policy)
        decision = ExecDecision(
            decision_id=uuid.uuid4().hex,
            allowed=judgement.allowed,
            outcome=judgement.outcome,
            mode=policy.document.mode,
            policy_version=policy.version,
            violations=judgement.violations,
        )
        self._audit_decision(
            ctx,
            decision,
            "container.exec",
            principal,
            resource=command_digest(request),
            container_id=request.container_id,
            image=request.image,
            env_names=sorted(request.env_names),
        )
        return decision

    def _audit_decision(
        self, ctx: CallContext, decision: Judged, action: str, principal: Principal, **judged: Any
    ) -> None:
        """Write the decision's record (who asked, on whose behalf, the rules it broke) before it is
        answered, and publish its violations."""
        rules = list(dict.fromkeys(v.rule for v in decision.violations))
        self._record(
            AuditRecord(
                seq=0,
                time=time.time(),
                decision_id=decision.decision_id,
                action=action,
                decision=decision.outcome,
                principal=principal,
                asked_by=ctx.caller,
                rules=rules,
                policy_version=decision.policy_version,
                **judged,
            )
        )
        if decision.violations:
            self.events.publish(
                PolicyViolation(
                    decision_id=decision.decision_id,
                    outcome=decision.outcome,
                    principal=principal,
                    asked_by=ctx.caller,
                    image=judged.get("image", ""),
                    rules=rules,
                    violations=decision.violations,
                    policy_version=decision.policy_version,
                )
            )

    @rpc
    def explain(self, request: PolicyExplain, ctx: CallContext) -> Explanation:
        policy, judgement = self._judge(request)
        return Explanation(
            decision=self._decision("", policy, judgement), checks=judgement.checks, summary=judgement.summary
        )

    @rpc
    def get(self, request: PolicyGet, ctx: CallContext) -> PolicyInfo:
        loaded = self._current()
        policy, refused = self._effective(request.override)
        return PolicyInfo(
            version=policy.version,
            source=loaded.source,
            mode=policy.document.mode,
            loaded_at=loaded.loaded_at,
            document=document.to_data(policy.document),
            narrowing=overrides.narrowing_data(policy),
            refused=refused,
            last_reload=self._last_reload,
        )

    @rpc
    def reload(self, request: PolicyReload, ctx: CallContext) -> ReloadResult:
        try:
            return self._reload(force=True)
        except document.DocumentError as error:
            raise invalid(
                f"policy {self.source.description} refused, the current policy stays: {error}",
                errors=msgspec.to_builtins(error.errors),
            ) from None

    @rpc
    def audit_verify(self, request: PolicyAuditVerify, ctx: CallContext) -> AuditReport:
        try:
            return audit.verify(self.audit_path)
        except FileNotFoundError:
            raise self._no_audit_log() from None

    @rpc(stream=True)
    def audit_tail(self, request: PolicyAuditTail, ctx: CallContext) -> Iterator[AuditRecords]:
        path = str(self.audit_path)
        try:
            records, offset = audit.read_tail(self.audit_path, request.limit, request.since)
            yield from self._batches(records)
            while request.follow:
                ctx.cancelled.wait(AUDIT_FOLLOW_POLL)
                ctx.check()
                records, offset = audit.read_after(self.audit_path, offset)
                yield from self._batches(records)
        except FileNotFoundError:
            raise self._no_audit_log() from None
        except ValueError as error:
            raise precondition(
                f"{path}: {error}; policy.audit_verify checks the whole log", path=path
            ) from None

    def _batches(self, records: list[AuditRecord]) -> Iterator[AuditRecords]:
        for start in range(0, len(records), AUDIT_BATCH):
            yield AuditRecords(path=str(self.audit_path), records=records[start : start + AUDIT_BATCH])

    def _no_audit_log(self) -> BusError:
        path = str(self.audit_path)
        return not_found(f"no audit log at {path}", path=path)

    @rpc
    def validate(self, request: PolicyValidate, ctx: CallContext) -> ValidationResult:
        try:
            data = document.parse_text(request.text)
            if request.as_override:
                policy, refused = overrides.tighten(self._current(), data)
                return ValidationResult(valid=not refused, errors=refused, version=policy.version)
            loaded = document.load(data, self.defaults)
        except document.DocumentError as error:
            return ValidationResult(valid=False, errors=error.errors)
        return ValidationResult(
            valid=True,
            warnings=document.allowlist_symlink_warnings(loaded.mounts.allowlist),
            version=document.version_of(loaded),
        )
