"""Bind-mount judgement: what a host path resolves to, and what access a principal gets to it.

Every source is judged after `os.path.realpath` on the host, so `..` and symlinks cannot lead a
mount somewhere the policy did not look. Then, in order:

1. the orchestrator's own mounts (the agent bus directory) are allowed, read-only;
2. blocked patterns and protected host paths deny, whatever the allowlist says. A name
   (`.ssh`) blocks any path with such a component; an absolute path blocks itself, everything
   under it, and every directory above it (mounting `/var` would expose `/var/run/docker.sock`);
3. the allowlist decides. An entry covers its path and everything under it. The candidates are
   ranked: an entry for the user beats one for a group, which beats one for everyone; then the
   most specific path wins (more components, then more literal components); among equals the
   most restrictive access wins (denied < readonly < readwrite). No entry means denied.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Sequence

from baaaht.common.policy.document import GLOB_CHARS, AllowEntry

ACCESS_ORDER = {"denied": 0, "readonly": 1, "readwrite": 2}


@dataclass(frozen=True)
class HostPaths:
    """Host paths that matter to mount judgement, from the host config."""

    protected: tuple[str, ...] = ()  # no container may see these, nor a directory above them
    system_mounts: tuple[str, ...] = ()  # mounted read-only into agents by the orchestrator itself


@dataclass(frozen=True)
class BindJudgement:
    source: str  # the resolved host path: what the engine will actually mount
    access: str  # denied | readonly | readwrite
    rule: str  # the rule that denied it, "" when allowed
    reason: str
    system: bool = False


def components(path: str) -> list[str]:
    return [part for part in path.split("/") if part]


def _overlaps(path: list[str], other: list[str], glob: bool) -> bool:
    """Whether one path lies at or under the other (component-wise, `*` within a component)."""
    for mine, theirs in zip(path, other, strict=False):  # the shorter one decides
        if not (fnmatchcase(mine, theirs) if glob else mine == theirs):
            return False
    return True


def blocked_by(resolved: str, patterns: Sequence[str], protected: Sequence[str]) -> str:
    """The pattern or protected path that blocks a resolved path, or ""."""
    parts = components(resolved)
    folded = [part.casefold() for part in parts]
    for pattern in patterns:
        if "/" in pattern:
            if _overlaps(parts, components(pattern), glob=True):
                return pattern
        # Case-folded: on a case-insensitive file system `.SSH` is `.ssh`.
        elif any(fnmatchcase(part, pattern.casefold()) for part in folded):
            return pattern
    for path in protected:
        for form in {path, os.path.realpath(path)}:
            if _overlaps(parts, components(form), glob=False):
                return path
    return ""


def _rank(
    entry: AllowEntry, user: str, groups: Sequence[str], parts: list[str]
) -> tuple[int, int, int] | None:
    """How strongly an entry applies to a path, or None when it does not apply."""
    if entry.user:
        if entry.user != user:
            return None
        audience = 3
    elif entry.group:
        if entry.group not in groups:
            return None
        audience = 2
    else:
        audience = 1
    entry_parts = components(entry.path)
    if len(entry_parts) > len(parts) or not _overlaps(parts, entry_parts, glob=True):
        return None
    literal = sum(1 for part in entry_parts if not GLOB_CHARS & set(part))
    return audience, len(entry_parts), literal


def resolve_access(path: str, user: str, groups: Sequence[str], entries: Sequence[AllowEntry]):
    """(access, the deciding entry or None) for a resolved path under one allowlist."""
    parts = components(path)
    ranked = [(rank, entry) for entry in entries if (rank := _rank(entry, user, groups, parts)) is not None]
    if not ranked:
        return "denied", None
    best = max(rank for rank, _ in ranked)
    return min(
        ((entry.mode, entry) for rank, entry in ranked if rank == best), key=lambda c: ACCESS_ORDER[c[0]]
    )


def describe(entry: AllowEntry) -> str:
    audience = f"user {entry.user}" if entry.user else f"group {entry.group}" if entry.group else "everyone"
    return f"allowlist entry {entry.path} ({entry.mode}, {audience})"


def judge_bind(
    source: str,
    *,
    user: str,
    groups: Sequence[str],
    allowlists: Sequence[Sequence[AllowEntry]],
    blocked_patterns: Sequence[str],
    host: HostPaths,
) -> BindJudgement:
    """The access a principal gets to a bind-mount source, under every allowlist layer at once."""
    if not source.startswith("/") or "\x00" in source:
        return BindJudgement(
            source, "denied", "mount.bind.source_invalid", "the source is not an absolute host path"
        )
    resolved = os.path.realpath(source)
    if resolved in {os.path.realpath(path) for path in host.system_mounts}:
        return BindJudgement(resolved, "readonly", "", "the orchestrator's own bus directory", system=True)
    via = f" ({source} resolves to {resolved})" if resolved != source else ""
    blocker = blocked_by(resolved, blocked_patterns, host.protected)
    if blocker:
        return BindJudgement(
            resolved, "denied", "mount.bind.blocked", f"{resolved} is blocked by {blocker!r}{via}"
        )
    # The most restrictive layer decides: a session's allowlist can only narrow the host's.
    access, entry = min(
        (resolve_access(resolved, user, groups, entries) for entries in allowlists),
        key=lambda decided: ACCESS_ORDER[decided[0]],
    )
    reason = f"{resolved}: " + (describe(entry) if entry else "no allowlist entry covers it") + via
    return BindJudgement(
        resolved, access, "mount.bind.source_not_allowed" if access == "denied" else "", reason
    )
