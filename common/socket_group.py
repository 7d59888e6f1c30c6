"""The group of the broker's sockets (`bus.socket_group`), which every agent container joins.

It is a dedicated, unprivileged group: a name (created by the broker with `groupadd --system` when
missing) or a numeric gid, never 0. With root's group every container would get supplementary group 0
and whatever that opens on the files it can see.
"""

from __future__ import annotations

import grp
import re
import subprocess

DEFAULT_SOCKET_GROUP = "baaaht-agent"
GROUPADD_TIMEOUT = 30.0
_NUMERIC = re.compile(r"[0-9]+")
_GROUP_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,31}")  # what groupadd accepts (no trailing $)


class GroupError(ValueError):
    """The socket group is unusable; the message says why and what to write instead."""


def problem_with(group: str) -> str:
    """Why `group` cannot be the socket group, or "" when it can (a missing name is created later)."""
    if _NUMERIC.fullmatch(group):
        return "is gid 0 (expected an unprivileged group)" if int(group) == 0 else ""
    if not _GROUP_NAME.fullmatch(group):
        return "is not a group name (expected e.g. baaaht-agent, or a numeric gid)"
    gid = _gid_of(group)
    return f"is group {gid}, root's (expected an unprivileged group)" if gid == 0 else ""


def ensure_gid(group: str) -> int:
    """The group's gid, creating the group when it is a name that does not exist yet."""
    problem = problem_with(group)
    if problem:
        raise GroupError(f"{group!r} {problem}")
    if _NUMERIC.fullmatch(group):
        return int(group)
    gid = _gid_of(group)
    if gid is None:
        try:
            _create(group)
        except GroupError:
            if _gid_of(group) is None:  # not another broker creating it at the same moment
                raise
        gid = _gid_of(group)
    if gid is None or gid == 0:
        raise GroupError(f"{group!r} was created but does not resolve to an unprivileged gid")
    return gid


def _gid_of(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def _create(name: str) -> None:
    try:
        subprocess.run(
            ["groupadd", "--system", name],
            check=True,
            capture_output=True,
            text=True,
            timeout=GROUPADD_TIMEOUT,
        )
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", None) or str(error)
        raise GroupError(
            f"{name!r} does not exist and could not be created ({detail.strip()}): create it "
            "(groupadd --system NAME) or set bus.socket_group to an existing unprivileged group"
        ) from None
