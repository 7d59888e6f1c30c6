"""evaluate(spec, principal, policy) -> Judgement: the rules, the enforced spec and the trace.

What the spec leaves unset is first filled from the policy document (services/policy/defaults.py:
user, limits, read-only rootfs with a tmpfs /tmp, init, `network_mode=none`, dropped capabilities,
no-new-privileges), then the rules judge the result, so the enforced spec is what runs. An explicit
request against the policy is a violation, never silently rewritten; the one exception is a bind
mount the allowlist grants read-only, which is downgraded (with a warning). Root is judged from
`spec.user` and `group_add` only, never from labels.
"""

from __future__ import annotations

import functools
import ipaddress
import math
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Callable

from baaaht.common.policy.document import (
    DEFAULT_BLOCKED_PATTERNS,
    UNLIMITED,
    PolicyDocument,
    is_numeric_id,
    normalize_capability,
)
from baaaht.common.policy.images import ImageError, matching, parse_pattern, parse_reference
from baaaht.common.units import render_size
from baaaht.schemas.containers import ContainerSpec
from baaaht.schemas.policy import Check, Outcome, Principal, Violation
from baaaht.services.policy import defaults
from baaaht.services.policy.defaults import NO_NEW_PRIVILEGES, split_option
from baaaht.services.policy.mounts import HostPaths, judge_bind
from baaaht.services.policy.overrides import EffectivePolicy

image_pattern = functools.lru_cache(maxsize=1024)(parse_pattern)


@dataclass
class Judgement:
    outcome: Outcome
    allowed: bool
    violations: list[Violation]
    warnings: list[Violation]
    enforced: ContainerSpec
    checks: list[Check]
    summary: str


@dataclass(frozen=True)
class Counts:
    """Containers already running, when the caller knows (None: the rule is not applied)."""

    host: int | None = None
    session: int | None = None


@dataclass
class _Judge:
    spec: ContainerSpec
    enforced: ContainerSpec
    policy: EffectivePolicy
    principal: Principal
    host: HostPaths
    counts: Counts
    checks: list[Check] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)
    warnings: list[Violation] = field(default_factory=list)

    @property
    def document(self) -> PolicyDocument:
        return self.policy.document

    def ok(self, rule: str, message: str) -> None:
        self.checks.append(Check(rule=rule, outcome="pass", message=message))

    def violation(
        self, rule: str, message: str, *, field: str = "", value: object = "", limit: object = ""
    ) -> None:
        self.checks.append(Check(rule=rule, outcome="violation", message=message))
        self.violations.append(
            Violation(rule=rule, message=message, field=field, value=_text(value), limit=_text(limit))
        )

    def warning(
        self, rule: str, message: str, *, field: str = "", value: object = "", limit: object = ""
    ) -> None:
        self.checks.append(Check(rule=rule, outcome="warning", message=message))
        self.warnings.append(
            Violation(rule=rule, message=message, field=field, value=_text(value), limit=_text(limit))
        )

    def enforce(self, rule: str, message: str) -> None:
        self.checks.append(Check(rule=rule, outcome="enforce", message=message))


def _text(value: object) -> str:
    return ", ".join(map(str, value)) if isinstance(value, list) else str(value)


def _name_refusal(name: str, denied: list[str], allow_lists: list[list[str]]) -> str:
    """Why a volume or network name is refused (a deny pattern wins; every allow-list must match),
    or "" when it is allowed."""
    for pattern in denied:
        if fnmatchcase(name, pattern):
            return f"matches the denied pattern {pattern!r}"
    if not all(any(fnmatchcase(name, pattern) for pattern in patterns) for patterns in allow_lists):
        return "matches no allowed pattern"
    return ""


# --- quotas ------------------------------------------------------------------------------------


def _quota(
    judge: _Judge,
    name: str,
    field_path: str,
    requested: float,
    low: float,
    high: float,
    show: Callable[[float], str],
) -> None:
    """Judge a value (the document's default when the request left it unset) against the limits."""
    if not (math.isfinite(requested) and requested > 0):
        unlimited = requested < 0 or math.isinf(requested)
        judge.violation(
            f"quota.{name}.max",
            f"{field_path} {'asks for no limit' if unlimited else 'is not a number'}; "
            f"the policy allows at most {show(high)}",
            field=field_path,
            value="unlimited" if unlimited else requested,
            limit=show(high),
        )
    elif requested > high:
        judge.violation(
            f"quota.{name}.max",
            f"{field_path} {show(requested)} is above the maximum {show(high)}",
            field=field_path,
            value=show(requested),
            limit=show(high),
        )
    elif requested < low:
        judge.warning(
            f"quota.{name}.min",
            f"{field_path} {show(requested)} is below the minimum {show(low)}",
            field=field_path,
            value=show(requested),
            limit=show(low),
        )
    else:
        judge.ok(f"quota.{name}.max", f"{field_path} {show(requested)} is within {show(low)}..{show(high)}")


def _memory_swap(judge: _Judge) -> None:
    limit = judge.document.quotas.max_memory_swap
    requested = judge.spec.resources.memory_swap
    shown = "unlimited" if limit == UNLIMITED else render_size(limit)
    if limit != UNLIMITED and (requested < 0 or requested > limit):
        asked = "unlimited" if requested < 0 else render_size(requested)
        judge.violation(
            "quota.memory_swap.max",
            f"resources.memory_swap {asked} is above {shown}",
            field="resources.memory_swap",
            value=asked,
            limit=shown,
        )
    else:
        judge.ok("quota.memory_swap.max", f"resources.memory_swap is within {shown}")


def _containers(judge: _Judge) -> None:
    quotas = judge.document.quotas
    for scope, running, limit in (
        ("host", judge.counts.host, quotas.max_containers),
        ("session", judge.counts.session, quotas.max_containers_per_session),
    ):
        if running is None:
            continue
        if running + 1 > limit:
            judge.violation(
                f"quota.containers.{scope}",
                f"{running} containers already run in this {scope}; the limit is {limit}",
                value=running + 1,
                limit=limit,
            )
        else:
            judge.ok(
                f"quota.containers.{scope}", f"container {running + 1} of at most {limit} in this {scope}"
            )


def check_quotas(judge: _Judge) -> None:
    quotas, requested = judge.document.quotas, judge.spec.resources
    _quota(judge, "cpu", "resources.cpus", requested.cpus, quotas.min_cpus, quotas.max_cpus, str)
    _quota(
        judge,
        "memory",
        "resources.memory",
        requested.memory,
        quotas.min_memory,
        quotas.max_memory,
        lambda size: render_size(int(size)),
    )
    _memory_swap(judge)
    _quota(judge, "pids", "resources.pids", requested.pids, 1, quotas.max_pids, str)
    _containers(judge)


# --- images ------------------------------------------------------------------------------------


def check_image(judge: _Judge) -> None:
    images = judge.document.images
    try:
        ref = parse_reference(judge.spec.image)
    except ImageError as error:
        judge.violation("image.invalid", str(error), field="image", value=judge.spec.image)
        return
    denied = matching([image_pattern(p) for p in images.denied], ref)
    if denied:
        judge.violation(
            "image.denied", f"{ref} matches the denied pattern {denied.text!r}", field="image", value=ref
        )
    for patterns in judge.policy.allow_lists("images.allowed"):
        if not matching([image_pattern(p) for p in patterns], ref):
            judge.violation(
                "image.not_allowed",
                f"{ref} matches no allowed pattern",
                field="image",
                value=ref,
                limit=patterns,
            )
            break
    else:
        if not denied:
            judge.ok("image.not_allowed", f"{ref} is allowed")
    if ref.pulls_latest and not images.allow_latest:
        what = "is untagged, which means :latest" if not ref.tag else "uses the :latest tag"
        judge.violation(
            "image.latest_tag", f"{judge.spec.image} {what}; pin a version", field="image", value=ref
        )
    if images.require_digest and not ref.digest:
        judge.violation(
            "image.digest_required", f"{ref} is not pinned by digest (@sha256:...)", field="image", value=ref
        )


# --- mounts ------------------------------------------------------------------------------------


def _bind(judge: _Judge, index: int) -> None:
    mount, enforced = judge.spec.mounts[index], judge.enforced.mounts[index]
    where = f"mounts[{index}]"
    mounts = judge.document.mounts
    verdict = judge_bind(
        mount.source,
        user=judge.principal.user,
        groups=judge.principal.groups,
        allowlists=judge.policy.allow_lists("mounts.allowlist"),
        blocked_patterns=(*DEFAULT_BLOCKED_PATTERNS, *mounts.blocked_patterns),
        host=judge.host,
    )
    if verdict.system:
        enforced.source, enforced.read_only = verdict.source, True
        judge.enforce("mount.bind.system", f"{where}: {verdict.reason}, mounted read-only")
    elif not mounts.allow_bind:
        judge.violation(
            "mount.bind.disabled",
            f"{where}: bind mounts are not allowed",
            field=f"{where}.source",
            value=mount.source,
        )
    elif verdict.rule:
        judge.violation(
            verdict.rule, f"{where}: {verdict.reason}", field=f"{where}.source", value=mount.source
        )
    else:
        # Mount what was judged: the resolved path, not a symlink that could be swapped later.
        enforced.source = verdict.source
        if verdict.access == "readonly" and not mount.read_only:
            enforced.read_only = True
            judge.warning(
                "mount.bind.readonly",
                f"{where}: downgraded to read-only by {verdict.reason}",
                field=f"{where}.read_only",
                value="read-write",
                limit="read-only",
            )
        else:
            judge.ok("mount.bind.source_not_allowed", f"{where}: {verdict.reason}")


def _volume(judge: _Judge, index: int) -> None:
    mount, where = judge.spec.mounts[index], f"mounts[{index}]"
    mounts = judge.document.mounts
    if not mounts.allow_volumes:
        judge.violation(
            "mount.volume.disabled", f"{where}: volumes are not allowed", field=where, value=mount.source
        )
        return
    # An anonymous volume is the engine's, labelled by nobody: it outlives a container removed without
    # its volumes and no reconcile finds it. It is judged as the name "", which only "*" allows.
    what = f"volume {mount.source!r}" if mount.source else "an anonymous volume"
    refusal = _name_refusal(
        mount.source, mounts.denied_volumes, judge.policy.allow_lists("mounts.allowed_volumes")
    )
    if refusal:
        judge.violation(
            "mount.volume.not_allowed",
            f"{where}: {what} {refusal}",
            field=f"{where}.source",
            value=mount.source,
        )
    else:
        judge.ok("mount.volume.not_allowed", f"{where}: {what} is allowed")


def _tmpfs(judge: _Judge, index: int) -> None:
    mount, where = judge.spec.mounts[index], f"mounts[{index}]"
    mounts = judge.document.mounts
    limit = render_size(mounts.max_tmpfs_size)
    if not mounts.allow_tmpfs:
        judge.violation("mount.tmpfs.disabled", f"{where}: tmpfs mounts are not allowed", field=where)
    elif not 0 < mount.tmpfs_size <= mounts.max_tmpfs_size:
        judge.violation(
            "mount.tmpfs.size_exceeded",
            f"{where}: tmpfs size {render_size(max(mount.tmpfs_size, 0))} is above {limit}",
            field=f"{where}.tmpfs_size",
            value=mount.tmpfs_size,
            limit=limit,
        )
    else:
        size = render_size(mount.tmpfs_size)
        judge.ok("mount.tmpfs.size_exceeded", f"{where}: tmpfs of {size} is within {limit}")


_MOUNT_RULES = {"bind": _bind, "volume": _volume, "tmpfs": _tmpfs}


def check_mounts(judge: _Judge) -> None:
    for index, mount in enumerate(judge.spec.mounts):
        _MOUNT_RULES[mount.type](judge, index)


# --- network -----------------------------------------------------------------------------------


def _network_name(judge: _Judge, where: str, name: str) -> None:
    network = judge.document.network
    refusal = _name_refusal(
        name, network.denied_networks, judge.policy.allow_lists("network.allowed_networks")
    )
    if refusal:
        judge.violation(
            "network.not_allowed", f"{where}: network {name!r} {refusal}", field=where, value=name
        )
    else:
        judge.ok("network.not_allowed", f"{where}: network {name!r} is allowed")


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _ports(judge: _Judge) -> None:
    network = judge.document.network
    if not judge.spec.ports:
        return
    if not (network.allow_network and network.allow_ports):
        judge.violation(
            "network.ports.disabled",
            "publishing ports is not allowed",
            field="ports",
            value=len(judge.spec.ports),
        )
        return
    for index, port in enumerate(judge.spec.ports):
        if _is_loopback(port.host_ip) or network.allow_public_ports:
            judge.ok(
                "network.ports.public", f"ports[{index}] is published on {port.host_ip or 'every address'}"
            )
        else:
            judge.violation(
                "network.ports.public",
                f"ports[{index}] is published on {port.host_ip or 'every address'}, not on loopback",
                field=f"ports[{index}].host_ip",
                value=port.host_ip or "0.0.0.0",
                limit="loopback",
            )


def check_network(judge: _Judge) -> None:
    network, mode = judge.document.network, judge.spec.network_mode
    if mode == "host":
        if not (network.allow_host_network and network.allow_network):
            judge.violation(
                "network.host", "the host's network is not allowed", field="network_mode", value=mode
            )
        else:
            judge.ok("network.host", "the host's network is allowed")
    elif mode.startswith("container:"):
        judge.violation(
            "network.container_mode",
            "sharing another container's network namespace escapes the network rules",
            field="network_mode",
            value=mode,
        )
    elif not network.allow_network:
        asked = [("network_mode", mode)] if mode not in ("", "none") else []
        asked += [(f"networks[{i}]", name) for i, name in enumerate(judge.spec.networks)]
        for where, name in asked:
            judge.violation(
                "network.disabled", f"{where}: networking is not allowed", field=where, value=name
            )
        if not asked:
            judge.ok("network.disabled", "network_mode is none")
    elif mode != "none":
        names = [(f"networks[{i}]", name) for i, name in enumerate(judge.spec.networks)]
        if mode or not names:
            names.insert(0, ("network_mode", mode or "bridge"))
        for where, name in names:
            _network_name(judge, where, name)
    _ports(judge)


# --- security ----------------------------------------------------------------------------------


def _numeric(text: str) -> int | None:
    return int(text) if is_numeric_id(text) else None


def _is_root(user: str) -> bool:
    # An unset user runs as the image's default user, which is root unless the image says otherwise.
    return user in ("", "root") or _numeric(user) == 0


def _user(judge: _Judge) -> None:
    security = judge.document.security
    user, _, group = judge.spec.user.partition(":")
    shown = judge.spec.user or "(unset: the image's default, usually root)"
    if _is_root(user) and not security.allow_root:
        judge.violation("security.root", f"user {shown} is root", field="user", value=shown, limit="non-root")
    elif security.require_non_root and not (_numeric(user) or 0) > 0:
        judge.violation(
            "security.non_root_required",
            f"user {shown} is not a numeric non-zero uid, so it cannot be proven non-root",
            field="user",
            value=shown,
            limit="numeric uid > 0",
        )
    else:
        judge.ok("security.root", f"user {shown} is allowed")
    if security.allowed_uids is not None:
        uid = 0 if user == "root" else _numeric(user)
        if uid not in security.allowed_uids:
            judge.violation(
                "security.uid.not_allowed",
                f"uid {user or '(unset)'} is not among the allowed uids",
                field="user",
                value=user,
                limit=security.allowed_uids,
            )
        else:
            judge.ok("security.uid.not_allowed", f"uid {uid} is allowed")
    if security.allowed_gids is not None:
        for where, gid_text in [("user", group)] + [
            (f"group_add[{i}]", g) for i, g in enumerate(judge.spec.group_add)
        ]:
            gid = 0 if gid_text == "root" else _numeric(gid_text)
            if gid not in security.allowed_gids:
                judge.violation(
                    "security.gid.not_allowed",
                    f"{where}: group {gid_text or '(unset: the image decides)'} is not an allowed gid",
                    field=where,
                    value=gid_text,
                    limit=security.allowed_gids,
                )
            else:
                judge.ok("security.gid.not_allowed", f"{where}: gid {gid} is allowed")


def _groups(judge: _Judge) -> None:
    """Group 0 and group names (which the image may map to gid 0), in `user` and in `group_add`."""
    security = judge.document.security
    _user, _, group = judge.spec.user.partition(":")
    asked = [("user", group)] if group else []
    asked += [(f"group_add[{i}]", name) for i, name in enumerate(judge.spec.group_add)]
    for where, name in asked:
        if (name == "root" or _numeric(name) == 0) and not security.allow_root_group:
            judge.violation(
                "security.root_group",
                f"{where}: group {name} is root's",
                field=where,
                value=name,
                limit="gid > 0",
            )
        elif _numeric(name) is None and name != "root" and not security.allow_group_names:
            judge.violation(
                "security.group_name",
                f"{where}: group {name!r} is a name, resolved inside the image (write a numeric gid)",
                field=where,
                value=name,
                limit="numeric gid",
            )
        else:
            judge.ok("security.root_group", f"{where}: group {name} is allowed")


def _capabilities(judge: _Judge) -> None:
    security = judge.document.security
    allowed = security.allowed_capabilities
    for index, name in enumerate(judge.spec.cap_add):
        if normalize_capability(name) in allowed:
            judge.ok("security.capability.not_allowed", f"cap_add[{index}] {name} is allowed")
        else:
            judge.violation(
                "security.capability.not_allowed",
                f"cap_add[{index}] {name} is not among the allowed capabilities",
                field=f"cap_add[{index}]",
                value=name,
                limit=allowed or "none",
            )
    dropped = {normalize_capability(name) for name in judge.spec.cap_drop}
    missing = [name for name in security.drop_capabilities if name not in dropped]
    if missing:
        judge.enforced.cap_drop = [*judge.spec.cap_drop, *missing]
        judge.enforce("security.capability.drop", f"capabilities always dropped: {', '.join(missing)}")


def _security_opts(judge: _Judge) -> None:
    security = judge.document.security
    no_new_privileges: list[str] = []  # the values given, e.g. "" (bare), "true", "false"
    for index, option in enumerate(judge.spec.security_opt):
        key, value = split_option(option)
        if key == NO_NEW_PRIVILEGES:
            no_new_privileges.append(value)
        elif not security.allow_security_opt:
            judge.violation(
                "security.security_opt",
                f"security_opt[{index}] {option!r} changes the container's confinement",
                field=f"security_opt[{index}]",
                value=option,
            )
    if not security.require_no_new_privileges:
        return
    switched_off = [value for value in no_new_privileges if value not in ("", "true")]
    if switched_off:
        judge.violation(
            "security.no_new_privileges.required",
            "no-new-privileges is switched off",
            field="security_opt",
            value=f"{NO_NEW_PRIVILEGES}:{switched_off[0]}",
            limit=f"{NO_NEW_PRIVILEGES}:true",
        )
    else:
        judge.ok("security.no_new_privileges.required", "no-new-privileges is on")


def check_security(judge: _Judge) -> None:
    security = judge.document.security
    if judge.spec.privileged and not security.allow_privileged:
        judge.violation(
            "security.privileged", "privileged containers are not allowed", field="privileged", value=True
        )
    else:
        judge.ok(
            "security.privileged", "not privileged" if not judge.spec.privileged else "privileged is allowed"
        )
    _user(judge)
    _groups(judge)
    _capabilities(judge)
    _security_opts(judge)
    if security.require_read_only_rootfs:
        if judge.spec.read_only_rootfs is False:
            judge.violation(
                "security.readonly_rootfs.required",
                "a writable root filesystem is not allowed",
                field="read_only_rootfs",
                value=False,
                limit=True,
            )
        else:
            judge.ok("security.readonly_rootfs.required", "root filesystem is read-only")


RULE_GROUPS = (check_image, check_quotas, check_mounts, check_network, check_security)


def _summary(outcome: Outcome, violations: list[Violation], warnings: list[Violation]) -> str:
    rules = ", ".join(dict.fromkeys(v.rule for v in violations))
    if outcome == "disabled":
        return "allowed: the policy is disabled, nothing was checked"
    if outcome == "deny":
        return f"denied by {rules}: {violations[0].message}"
    if outcome == "permissive":
        return f"allowed in permissive mode despite {rules}: {violations[0].message}"
    noted = f" ({len(warnings)} warning{'s' if len(warnings) != 1 else ''})" if warnings else ""
    return f"allowed: every rule passed{noted}"


def evaluate(
    spec: ContainerSpec,
    principal: Principal,
    policy: EffectivePolicy,
    host: HostPaths,
    counts: Counts = Counts(),
) -> Judgement:
    filled, defaulted = defaults.fill(spec, policy.document)
    if policy.document.mode == "disabled":
        disabled = Check(rule="policy.mode", outcome="pass", message="the policy mode is disabled")
        checks = [*defaulted, disabled]
        return Judgement("disabled", True, [], [], filled, checks, _summary("disabled", [], []))
    judge = _Judge(filled, defaults.copy(filled), policy, principal, host, counts, checks=defaulted)
    for rule_group in RULE_GROUPS:
        rule_group(judge)
    if not judge.violations:
        outcome: Outcome = "allow"
    else:
        outcome = "deny" if policy.document.mode == "strict" else "permissive"
    return Judgement(
        outcome,
        outcome != "deny",
        judge.violations,
        judge.warnings,
        judge.enforced,
        judge.checks,
        _summary(outcome, judge.violations, judge.warnings),
    )


@dataclass(frozen=True)
class ExecJudgement:
    outcome: Outcome
    allowed: bool
    violations: list[Violation]


def evaluate_exec(container_session: str, principal: Principal, policy: EffectivePolicy) -> ExecJudgement:
    """Whether `principal` may run a command in a container of session `container_session` ("" for a pool
    or system container): a principal of a session only in that session's containers; the host's own
    principals (no session) anywhere. The mode decides as for a container spec."""
    mode = policy.document.mode
    if mode == "disabled":
        return ExecJudgement("disabled", True, [])
    violations = []
    if principal.session_id and principal.session_id != container_session:
        where = f"session {container_session}" if container_session else "no session"
        violations.append(
            Violation(
                rule="exec.session",
                message=f"a principal of session {principal.session_id} may not run commands in a "
                f"container of {where}",
                field="container_id",
                value=container_session,
                limit=principal.session_id,
            )
        )
    if not violations:
        return ExecJudgement("allow", True, [])
    outcome: Outcome = "deny" if mode == "strict" else "permissive"
    return ExecJudgement(outcome, outcome != "deny", violations)
