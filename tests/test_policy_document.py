"""Policy documents: loading, field-path errors, defaults from the host config, the built-in policy."""

from __future__ import annotations

import pytest

from baaaht.common.policy import document
from baaaht.common.policy.document import UNLIMITED, DocumentError, HostDefaults
from baaaht.schemas.config import Config, PolicyConfig, Size

DEFAULTS = HostDefaults(max_memory=512_000_000, max_containers=10)


def errors_of(data) -> list[tuple[str, str]]:
    with pytest.raises(DocumentError) as caught:
        document.load(data, DEFAULTS)
    return [(error.path, error.message) for error in caught.value.errors]


def test_the_builtin_policy_is_strict_and_default_deny():
    policy = document.builtin(DEFAULTS)
    assert policy.mode == "strict"
    assert not policy.mounts.allow_bind and policy.mounts.allowlist == []
    assert not policy.network.allow_network and not policy.network.allow_host_network
    assert not policy.network.allow_ports
    assert not policy.images.allow_latest
    security = policy.security
    assert not security.allow_privileged and not security.allow_root and security.require_non_root
    assert security.allowed_capabilities == [] and security.drop_capabilities == ["ALL"]
    assert security.require_no_new_privileges and security.require_read_only_rootfs


def test_host_config_feeds_the_default_quotas():
    config = Config(policy=PolicyConfig(max_memory=Size(256 * 1024 * 1024), max_containers=4))
    quotas = document.builtin(HostDefaults.for_config(config)).quotas
    assert quotas.max_memory == quotas.default_memory == 256 * 1024 * 1024
    assert quotas.max_memory_swap == quotas.max_memory  # no swap unless a document says so
    assert quotas.max_containers == quotas.max_containers_per_session == 4


def test_a_document_overrides_the_host_defaults_and_reads_sizes():
    policy = document.load(
        {
            "quotas": {"max_memory": "1GiB", "default_memory": "256MB", "max_memory_swap": "unlimited"},
            "mounts": {"max_tmpfs_size": "64MiB"},
        },
        DEFAULTS,
    )
    assert policy.quotas.max_memory == 1024**3
    assert policy.quotas.default_memory == 256_000_000
    assert policy.quotas.max_memory_swap == UNLIMITED
    assert policy.mounts.max_tmpfs_size == 64 * 1024**2


def test_capabilities_are_normalized():
    policy = document.load(
        {
            "security": {
                "allowed_capabilities": ["cap_net_bind_service"],
                "drop_capabilities": ["all", "CAP_NET_RAW"],
            }
        },
        DEFAULTS,
    )
    assert policy.security.allowed_capabilities == ["NET_BIND_SERVICE"]
    assert policy.security.drop_capabilities == ["ALL", "NET_RAW"]


@pytest.mark.parametrize(
    "data, path, message",
    [
        ({"modes": "strict"}, "modes", "unknown field"),
        ({"security": {"allow_rot": True}}, "security.allow_rot", "unknown field"),
        (
            {"mounts": {"allowlist": [{"path": "/srv", "mode": "readonly", "usr": "a"}]}},
            "mounts.allowlist[0].usr",
            "unknown field",
        ),
        ({"mode": "lenient"}, "mode", "expected one of strict, permissive, disabled"),
        ({"quotas": {"max_pids": 0}}, "quotas.max_pids", ">= 1"),
        ({"quotas": {"max_cpus": -1}}, "quotas.max_cpus", "> 0"),
        ({"quotas": {"max_memory": "lots"}}, "quotas.max_memory", "is not a size"),
        ({"quotas": {"max_memory_swap": "-2"}}, "quotas.max_memory_swap", "is not a size"),
        (
            {"network": {"allow_network": "yes please"}},
            "network.allow_network",
            "Expected `bool`".replace("`", ""),
        ),
        ({"security": {"allowed_uids": [-1]}}, "security.allowed_uids[0]", ">= 0"),
        (
            {"mounts": {"allowlist": [{"path": "srv", "mode": "readonly"}]}},
            "mounts.allowlist[0].path",
            "clean absolute",
        ),
        (
            {"mounts": {"allowlist": [{"path": "/srv/../etc", "mode": "readonly"}]}},
            "mounts.allowlist[0].path",
            "clean absolute",
        ),
        (
            {"mounts": {"allowlist": [{"path": "/srv", "mode": "readonly", "user": "a", "group": "b"}]}},
            "mounts.allowlist[0]",
            "both user and group",
        ),
        (
            {"mounts": {"allowlist": [{"path": "/srv", "mode": "write"}]}},
            "mounts.allowlist[0].mode",
            "expected one of denied, readonly, readwrite",
        ),
        (
            {"mounts": {"blocked_patterns": ["relative/path"]}},
            "mounts.blocked_patterns[0]",
            "clean and absolute",
        ),
        ({"mounts": {"blocked_patterns": [" "]}}, "mounts.blocked_patterns[0]", "empty"),
        ({"mounts": {"max_tmpfs_size": 0}}, "mounts.max_tmpfs_size", "above zero"),
        ({"images": {"allowed": ["ok", "Bad Pattern"]}}, "images.allowed[1]", "image pattern"),
        ({"images": {"denied": ["img@sha256:zz"]}}, "images.denied[0]", "invalid digest"),
        ({"network": {"allowed_networks": [""]}}, "network.allowed_networks[0]", "empty"),
        (
            {"security": {"allowed_capabilities": ["NET_ROW"]}},
            "security.allowed_capabilities[0]",
            "not a Linux capability",
        ),
        ({"security": {"allowed_capabilities": ["ALL"]}}, "security.allowed_capabilities[0]", "one by one"),
        ({"quotas": {"min_cpus": 2, "default_cpus": 1}}, "quotas.default_cpus", "not between"),
        ({"quotas": {"max_memory": "1GB", "default_memory": "2GB"}}, "quotas.default_memory", "not between"),
        (
            {"quotas": {"max_memory": "1GB", "max_memory_swap": "512MB"}},
            "quotas.max_memory_swap",
            "below max_memory",
        ),
        ({"security": {"allow_root": True}}, "security.allow_root", "contradicts require_non_root"),
        (
            {"security": {"allowed_capabilities": ["NET_RAW"], "drop_capabilities": ["ALL", "NET_RAW"]}},
            "security.allowed_capabilities[0]",
            "also in drop_capabilities",
        ),
    ],
)
def test_bad_documents_are_refused_with_the_field_path(data, path, message):
    errors = errors_of(data)
    assert any(p == path and message in m for p, m in errors), errors


def test_every_field_problem_is_reported_at_once():
    errors = errors_of(
        {
            "mounts": {"allowlist": [{"path": "rel", "mode": "readonly"}], "blocked_patterns": [""]},
            "images": {"allowed": [""]},
        }
    )
    assert [path for path, _ in errors] == [
        "mounts.allowlist[0].path",
        "mounts.blocked_patterns[0]",
        "images.allowed[0]",
    ]


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty"),
        ("- a\n- b\n", "expected a mapping"),
        ("mode: strict\nmode: permissive\n", "given twice"),
        ("mode: [strict\n", "not valid YAML"),
        ('{"mode": ', "not valid YAML"),
    ],
)
def test_unreadable_text_is_refused(text, message):
    with pytest.raises(DocumentError, match=message):
        document.parse_text(text)


def test_yaml_and_json_give_the_same_policy():
    from_yaml = document.load(
        document.parse_text(
            "mode: permissive\nquotas:\n  max_pids: 64\nimages:\n  allowed: ['ghcr.io/org/*']\n"
        ),
        DEFAULTS,
    )
    from_json = document.load(
        document.parse_text(
            '{"mode": "permissive", "quotas": {"max_pids": 64}, "images": {"allowed": ["ghcr.io/org/*"]}}'
        ),
        DEFAULTS,
    )
    assert from_yaml == from_json
    assert document.version_of(from_yaml) == document.version_of(from_json)


def test_the_version_changes_with_the_content_only():
    first = document.load({"labels": {"a": "1", "b": "2"}}, DEFAULTS)
    same = document.load({"labels": {"b": "2", "a": "1"}}, DEFAULTS)
    other = document.load({"labels": {"a": "1", "b": "3"}}, DEFAULTS)
    assert document.version_of(first) == document.version_of(same) != document.version_of(other)


def test_to_data_round_trips_through_load():
    policy = document.load({"quotas": {"max_memory": "1GiB", "max_memory_swap": "unlimited"}}, DEFAULTS)
    data = document.to_data(policy)
    assert data["quotas"]["max_memory"] == "1GiB"
    assert data["quotas"]["max_memory_swap"] == "unlimited"
    assert document.load(data, DEFAULTS) == policy
