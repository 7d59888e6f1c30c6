"""Session overrides tighten the host policy and never loosen it."""

from __future__ import annotations

import msgspec
import pytest

from baaaht.common.policy import document
from baaaht.common.policy.document import DocumentError, HostDefaults, PolicyDocument, Section
from baaaht.schemas.containers import ContainerSpec, Mount, Resources
from baaaht.schemas.policy import Principal
from baaaht.services.policy import engine, overrides
from baaaht.services.policy.mounts import HostPaths

DEFAULTS = HostDefaults(max_memory=512 * 1024 * 1024, max_containers=10)
HOST = {
    "mode": "permissive",
    "quotas": {"max_memory_swap": "1GiB"},
    "mounts": {"allow_bind": True},
    "network": {"allow_network": True},
    "security": {"allowed_capabilities": ["NET_BIND_SERVICE", "NET_RAW"], "allowed_uids": [1000, 1001]},
}


def loaded(data: dict | None = None) -> document.LoadedPolicy:
    return document.LoadedPolicy.of(document.load(HOST if data is None else data, DEFAULTS), "test", 0.0)


def leaf_paths(struct: type = PolicyDocument, prefix: str = "") -> list[str]:
    paths = []
    for info in msgspec.structs.fields(struct):
        if isinstance(info.type, type) and issubclass(info.type, Section):
            paths += leaf_paths(info.type, f"{prefix}{info.encode_name}.")
        else:
            paths.append(prefix + info.encode_name)
    return paths


def test_every_policy_field_has_a_tightening_rule():
    assert sorted(overrides.TIGHTENING) == sorted(leaf_paths())


def test_no_override_is_the_host_policy():
    policy, refused = overrides.tighten(loaded(), {})
    assert policy.document == loaded().document and policy.version == loaded().version and refused == []


@pytest.mark.parametrize(
    "override, path, expected",
    [
        ({"mode": "strict"}, "mode", "strict"),
        ({"quotas": {"max_memory": "256MiB"}}, "quotas.max_memory", 256 * 1024 * 1024),
        (
            {"quotas": {"max_memory": "256MiB"}},
            "quotas.default_memory",
            256 * 1024 * 1024,
        ),  # kept under the max
        ({"quotas": {"max_memory_swap": "512MiB"}}, "quotas.max_memory_swap", 512 * 1024 * 1024),
        ({"quotas": {"min_cpus": 0.5}}, "quotas.min_cpus", 0.5),
        ({"quotas": {"max_pids": 10}}, "quotas.default_pids", 10),
        ({"quotas": {"max_containers_per_session": 2}}, "quotas.max_containers_per_session", 2),
        ({"mounts": {"allow_bind": False}}, "mounts.allow_bind", False),
        ({"mounts": {"blocked_patterns": [".cache"]}}, "mounts.blocked_patterns", [".cache"]),
        ({"mounts": {"max_tmpfs_size": "1MiB"}}, "mounts.max_tmpfs_size", 1024 * 1024),
        ({"images": {"denied": ["python"]}}, "images.denied", ["python"]),
        ({"images": {"require_digest": True}}, "images.require_digest", True),
        ({"network": {"allow_network": False}}, "network.allow_network", False),
        ({"security": {"require_read_only_rootfs": True}}, "security.require_read_only_rootfs", True),
        ({"security": {"allowed_capabilities": ["net_raw"]}}, "security.allowed_capabilities", ["NET_RAW"]),
        (
            {"security": {"drop_capabilities": ["NET_RAW"]}},
            "security.allowed_capabilities",
            ["NET_BIND_SERVICE"],
        ),
        ({"security": {"allowed_uids": [1001]}}, "security.allowed_uids", [1001]),
        ({"security": {"allowed_gids": [1000]}}, "security.allowed_gids", [1000]),
    ],
)
def test_tightening_is_applied(override, path, expected):
    policy, refused = overrides.tighten(loaded(), override)
    assert refused == []
    section, _, key = path.partition(".")
    value = getattr(getattr(policy.document, section), key) if key else getattr(policy.document, section)
    assert value == expected


@pytest.mark.parametrize(
    "override, path",
    [
        ({"mode": "disabled"}, "mode"),
        ({"quotas": {"max_memory": "64GiB"}}, "quotas.max_memory"),
        ({"quotas": {"max_memory_swap": "unlimited"}}, "quotas.max_memory_swap"),
        ({"quotas": {"min_memory": 0}}, "quotas.min_memory"),
        ({"quotas": {"max_containers": 100}}, "quotas.max_containers"),
        ({"mounts": {"allow_tmpfs": True, "max_tmpfs_size": "10GiB"}}, "mounts.max_tmpfs_size"),
        ({"images": {"allow_latest": True}}, "images.allow_latest"),
        ({"network": {"allow_host_network": True}}, "network.allow_host_network"),
        ({"security": {"allow_privileged": True}}, "security.allow_privileged"),
        ({"security": {"require_non_root": False}}, "security.require_non_root"),
        ({"name": "mine"}, "name"),
    ],
)
def test_loosening_is_refused_and_the_host_value_stays(override, path):
    host = loaded()
    policy, refused = overrides.tighten(host, override)
    assert [error.path for error in refused] == [path]
    assert "would loosen the host policy" in refused[0].message
    assert document.to_data(policy.document) == document.to_data(host.document)


@pytest.mark.parametrize(
    "key, session, kept",
    [
        ("allowed_capabilities", ["SYS_ADMIN", "NET_RAW"], ["NET_RAW"]),
        ("allowed_uids", [0, 1001], [1001]),
    ],
)
def test_exact_allow_lists_keep_only_what_both_allow(key, session, kept):
    policy, refused = overrides.tighten(loaded(), {"security": {key: session}})
    assert getattr(policy.document.security, key) == kept
    assert [error.path for error in refused] == [f"security.{key}"]


def test_a_mixed_override_keeps_its_tightening_and_drops_its_loosening():
    policy, refused = overrides.tighten(
        loaded(),
        {"quotas": {"max_memory": "128MiB", "max_pids": 99999}, "security": {"allow_privileged": True}},
    )
    assert policy.document.quotas.max_memory == 128 * 1024 * 1024
    assert policy.document.quotas.max_pids == 1024
    assert not policy.document.security.allow_privileged
    assert sorted(error.path for error in refused) == ["quotas.max_pids", "security.allow_privileged"]


def test_allow_lists_narrow_without_widening(tmp_path):
    wide = loaded({**HOST, "images": {"allowed": ["ghcr.io/org/*"]}})
    policy, refused = overrides.tighten(wide, {"images": {"allowed": ["ghcr.io/org/app", "docker.io/*"]}})
    assert refused == []
    principal, host = Principal(user="alice"), HostPaths()

    def allowed(image: str) -> bool:
        spec = ContainerSpec(image=image, user="1000", read_only_rootfs=True, resources=Resources())
        judgement = engine.evaluate(spec, principal, policy, host)
        return "image.not_allowed" not in {v.rule for v in judgement.violations}

    assert allowed("ghcr.io/org/app:1")
    assert not allowed("ghcr.io/org/other:1")  # allowed by the host, not by the session
    assert not allowed("python:3")  # allowed by the session, not by the host


def test_a_session_allowlist_only_narrows_bind_mounts(tmp_path):
    root = tmp_path.resolve()
    (root / "work" / "sub").mkdir(parents=True)
    host = loaded(
        {**HOST, "mounts": {"allow_bind": True, "allowlist": [{"path": str(root), "mode": "readwrite"}]}}
    )
    session = {
        "mounts": {
            "allowlist": [
                {"path": "/", "mode": "readwrite"},
                {"path": str(root / "work"), "mode": "readonly"},
            ]
        }
    }
    policy, _ = overrides.tighten(host, session)

    def judged(path) -> tuple[bool, bool]:
        spec = ContainerSpec(
            image="busybox:1", user="1000", mounts=[Mount(type="bind", source=str(path), target="/m")]
        )
        judgement = engine.evaluate(spec, Principal(user="alice"), policy, HostPaths())
        return "mount.bind.source_not_allowed" not in {
            v.rule for v in judgement.violations
        }, judgement.enforced.mounts[0].read_only

    assert judged(root) == (True, False)
    assert judged(root / "work" / "sub") == (True, True)  # the session's read-only entry
    assert judged("/etc")[0] is False  # the session's `/` does not widen the host's allowlist


@pytest.mark.parametrize(
    "override, path",
    [
        ({"quotas": {"max_memroy": "1GB"}}, "quotas.max_memroy"),
        ({"max_memory": "1GB"}, "max_memory"),
        ({"security": {"allow_root": "no"}}, "security.allow_root"),
        ({"mounts": {"allowlist": [{"path": "rel", "mode": "readonly"}]}}, "mounts.allowlist[0].path"),
    ],
)
def test_a_malformed_override_is_an_error_with_its_path(override, path):
    with pytest.raises(DocumentError) as caught:
        overrides.tighten(loaded(), override)
    assert [error.path for error in caught.value.errors] == [path]


def test_an_override_changes_the_version():
    host = loaded()
    first, _ = overrides.tighten(host, {"quotas": {"max_pids": 10}})
    second, _ = overrides.tighten(host, {"quotas": {"max_pids": 11}})
    assert first.version.startswith(host.version + "+")
    assert first.version != second.version
