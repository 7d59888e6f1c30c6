"""Bind-mount judgement on the real file system: realpath, blocked patterns, the allowlist ranking."""

from __future__ import annotations

import os

import pytest

from baaaht.common.policy.document import DEFAULT_BLOCKED_PATTERNS, AllowEntry
from baaaht.schemas.config import Config
from baaaht.services.policy.mounts import HostPaths, judge_bind, resolve_access
from baaaht.services.policy.service import host_paths_for


def entry(path: str, mode: str, user: str = "", group: str = "") -> AllowEntry:
    return AllowEntry(path=path, mode=mode, user=user, group=group)


@pytest.mark.parametrize(
    "entries, path, expected",
    [
        ([], "/srv/data", "denied"),  # no entry: denied
        (
            [entry("/srv", "readwrite")],
            "/srv/data/deep/file",
            "readwrite",
        ),  # an entry covers what is under it
        ([entry("/srv", "readwrite")], "/srvx", "denied"),  # by component, not by string prefix
        ([entry("/srv", "readwrite")], "/", "denied"),
        ([entry("/", "readonly")], "/anything", "readonly"),
        # The most specific path wins, whichever way it goes.
        ([entry("/srv", "readwrite"), entry("/srv/secret", "denied")], "/srv/secret/x", "denied"),
        ([entry("/srv", "denied"), entry("/srv/public", "readonly")], "/srv/public/x", "readonly"),
        ([entry("/srv", "readwrite"), entry("/srv/ro", "readonly")], "/srv/ro", "readonly"),
        # Among equals the most restrictive wins, in any order (the original let the first win).
        ([entry("/srv", "readwrite"), entry("/srv", "denied")], "/srv/x", "denied"),
        ([entry("/srv", "denied"), entry("/srv", "readwrite")], "/srv/x", "denied"),
        ([entry("/srv", "readwrite"), entry("/srv", "readonly")], "/srv/x", "readonly"),
        # `*` stays within one component; a literal component is more specific than a glob.
        ([entry("/home/*/projects", "readwrite")], "/home/alice/projects/app", "readwrite"),
        ([entry("/home/*/projects", "readwrite")], "/home/alice/x/projects", "denied"),
        (
            [entry("/home/*/projects", "readwrite"), entry("/home/alice/projects", "readonly")],
            "/home/alice/projects",
            "readonly",
        ),
        # A user's entry beats a group's, which beats everyone's.
        ([entry("/srv", "readonly"), entry("/srv", "readwrite", user="alice")], "/srv/x", "readwrite"),
        ([entry("/srv", "readwrite"), entry("/srv", "denied", user="alice")], "/srv/x", "denied"),
        (
            [entry("/srv", "readwrite", group="dev"), entry("/srv", "readonly", user="alice")],
            "/srv/x",
            "readonly",
        ),
        ([entry("/srv", "denied"), entry("/srv", "readonly", group="dev")], "/srv/x", "readonly"),
        (
            [entry("/srv/shared", "readwrite"), entry("/srv", "readonly", user="alice")],
            "/srv/shared/x",
            "readonly",
        ),
        # Entries for other users and groups do not apply.
        ([entry("/srv", "readwrite", user="bob")], "/srv/x", "denied"),
        ([entry("/srv", "readwrite", group="ops")], "/srv/x", "denied"),
    ],
)
def test_the_allowlist_ranking(entries, path, expected):
    access, _entry = resolve_access(path, "alice", ["dev"], entries)
    assert access == expected


@pytest.fixture
def tree(tmp_path):
    """/allowed (allowlisted read-write), /allowed/ro (read-only), /secret (not allowlisted), symlinks."""
    root = tmp_path.resolve()
    for name in ("allowed/ro", "allowed/.ssh", "allowed/project", "secret", "protected/inner"):
        (root / name).mkdir(parents=True)
    (root / "allowed" / "escape").symlink_to(root / "secret")
    (root / "allowed" / "keys").symlink_to(root / "allowed" / ".ssh")
    (root / "allowed" / "into-protected").symlink_to(root / "protected" / "inner")
    return root


def judge(tree, source: str, user: str = "alice", allowlists=None):
    allowlists = allowlists or [
        [entry(f"{tree}/allowed", "readwrite"), entry(f"{tree}/allowed/ro", "readonly")]
    ]
    return judge_bind(
        source,
        user=user,
        groups=[],
        allowlists=allowlists,
        blocked_patterns=DEFAULT_BLOCKED_PATTERNS,
        host=HostPaths(protected=(f"{tree}/protected",), system_mounts=(f"{tree}/protected/agent",)),
    )


def test_an_allowlisted_directory_is_mounted_as_resolved(tree):
    verdict = judge(tree, f"{tree}/allowed/project")
    assert (verdict.access, verdict.rule, verdict.source) == ("readwrite", "", f"{tree}/allowed/project")


def test_read_only_entries_give_read_only_access(tree):
    assert judge(tree, f"{tree}/allowed/ro").access == "readonly"


@pytest.mark.parametrize(
    "relative, rule",
    [
        ("allowed/escape", "mount.bind.source_not_allowed"),  # a symlink out of the allowlist
        ("allowed/../secret", "mount.bind.source_not_allowed"),  # `..` out of the allowlist
        ("allowed/project/../../secret", "mount.bind.source_not_allowed"),
        ("allowed/keys", "mount.bind.blocked"),  # a symlink into a blocked place
        ("allowed/.ssh", "mount.bind.blocked"),
        ("allowed/.SSH", "mount.bind.blocked"),  # case-insensitive file systems
        ("allowed/into-protected", "mount.bind.blocked"),
        ("protected", "mount.bind.blocked"),
        ("", "mount.bind.blocked"),  # a parent of a protected path
    ],
)
def test_escapes_are_judged_after_resolving(tree, relative, rule):
    verdict = judge(tree, f"{tree}/{relative}".rstrip("/"))
    assert (verdict.access, verdict.rule) == ("denied", rule), verdict.reason


def test_the_reason_names_where_a_symlink_leads(tree):
    verdict = judge(tree, f"{tree}/allowed/escape")
    assert f"resolves to {tree}/secret" in verdict.reason


@pytest.mark.parametrize("source", ["relative/path", "", "~/x", "/ok\x00/x"])
def test_sources_must_be_absolute_host_paths(tree, source):
    assert judge(tree, source).rule == "mount.bind.source_invalid"


def test_blocked_patterns_beat_the_allowlist(tree):
    everything = [[entry("/", "readwrite")]]
    assert judge(tree, f"{tree}/allowed/.ssh", allowlists=everything).rule == "mount.bind.blocked"
    assert judge(tree, "/var/run/docker.sock", allowlists=everything).rule == "mount.bind.blocked"


@pytest.mark.parametrize("path", ["/", "/var", "/var/run", "/run"])
def test_parents_of_the_docker_socket_are_blocked(path):
    verdict = judge_bind(
        path,
        user="",
        groups=[],
        allowlists=[[entry("/", "readwrite")]],
        blocked_patterns=(),
        host=HostPaths(protected=("/var/run/docker.sock",)),
    )
    assert verdict.rule == "mount.bind.blocked"


@pytest.mark.parametrize(
    "path",
    [
        "/var/lib/docker/volumes/baaaht-0123456789ab-other-workspace/_data",  # another session's files
        "/var/lib/docker/containers",  # every container's configuration, with its environment
    ],
)
def test_the_engines_data_is_never_mounted_whatever_the_allowlist(path):
    verdict = judge_bind(
        path,
        user="",
        groups=[],
        allowlists=[[entry("/", "readonly")]],
        blocked_patterns=(),
        host=host_paths_for(Config()),
    )
    assert verdict.rule == "mount.bind.blocked", verdict.reason


def test_absolute_blocked_patterns_take_globs(tree):
    verdict = judge_bind(
        f"{tree}/allowed/project",
        user="",
        groups=[],
        allowlists=[[entry("/", "readwrite")]],
        blocked_patterns=(f"{tree}/*/project",),
        host=HostPaths(),
    )
    assert verdict.rule == "mount.bind.blocked"


def test_the_agent_bus_directory_is_allowed_read_only_despite_protection(tree):
    agent = tree / "protected" / "agent"
    agent.mkdir()
    verdict = judge(tree, str(agent), allowlists=[[]])
    assert (verdict.access, verdict.system) == ("readonly", True)
    assert judge(tree, f"{agent}/sub").rule == "mount.bind.blocked"


def test_every_allowlist_layer_must_allow(tree):
    host = [entry(f"{tree}/allowed", "readwrite")]
    session_narrower = [entry(f"{tree}/allowed/project", "readonly")]
    assert judge(tree, f"{tree}/allowed/project", allowlists=[host, session_narrower]).access == "readonly"
    assert judge(tree, f"{tree}/allowed/ro", allowlists=[host, session_narrower]).access == "denied"
    session_wider = [entry("/", "readwrite")]
    assert judge(tree, f"{tree}/secret", allowlists=[host, session_wider]).access == "denied"


def test_a_missing_source_is_judged_by_where_it_would_be(tree):
    assert judge(tree, f"{tree}/allowed/not-yet").access == "readwrite"
    os.symlink(f"{tree}/secret/not-yet", f"{tree}/allowed/dangling")
    assert judge(tree, f"{tree}/allowed/dangling").access == "denied"
