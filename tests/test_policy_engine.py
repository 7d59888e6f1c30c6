"""The rules, one table row each, plus modes and the enforced spec."""

from __future__ import annotations

import msgspec
import pytest

from baaaht.common.policy import document
from baaaht.common.policy.document import HostDefaults
from baaaht.schemas.containers import ContainerSpec, Mount, PortBinding, Resources
from baaaht.schemas.policy import Principal
from baaaht.services.policy import engine, overrides
from baaaht.services.policy.mounts import HostPaths

DEFAULTS = HostDefaults(max_memory=512 * 1024 * 1024, max_containers=10)
MIB = 1024 * 1024
DIGEST = "sha256:" + "b" * 64
ALICE = Principal(user="alice", groups=["dev"], session_id="s1", role="agent")

# A spec with every field set the way the built-in policy would fill it: allowed, and left as it is.
SAFE = ContainerSpec(
    image="busybox:1.36",
    user="1000:1000",
    init=True,
    cap_drop=["ALL"],
    security_opt=["no-new-privileges:true"],
    read_only_rootfs=True,
    network_mode="none",
    mounts=[Mount(type="tmpfs", target="/tmp", tmpfs_size=16 * MIB)],
    resources=Resources(cpus=1.0, memory=64 * MIB, memory_swap=64 * MIB, pids=128),
)


NO_PATHS = HostPaths()
NO_COUNTS = engine.Counts()


def effective(data: dict | None = None, override: dict | None = None) -> overrides.EffectivePolicy:
    loaded = document.LoadedPolicy.of(document.load(data or {}, DEFAULTS), "test", 0.0)
    policy, _refused = overrides.tighten(loaded, override or {})
    return policy


def evaluate(
    changes: dict | None = None,
    data: dict | None = None,
    *,
    principal: Principal = ALICE,
    host: HostPaths = NO_PATHS,
    counts: engine.Counts = NO_COUNTS,
    override: dict | None = None,
) -> engine.Judgement:
    spec = msgspec.structs.replace(SAFE, **(changes or {}))
    return engine.evaluate(spec, principal, effective(data, override), host, counts)


def rules(judgement: engine.Judgement) -> set[str]:
    return {violation.rule for violation in judgement.violations}


def resources(**values) -> Resources:
    return msgspec.structs.replace(SAFE.resources, **values)


NETWORKED = {"network": {"allow_network": True}}


def test_the_hardened_spec_is_allowed_by_the_builtin_policy():
    judgement = evaluate()
    assert (judgement.outcome, judgement.allowed, judgement.violations, judgement.warnings) == (
        "allow",
        True,
        [],
        [],
    )
    assert judgement.enforced == SAFE


@pytest.mark.parametrize(
    "changes, data, expected",
    [
        # quotas
        ({"resources": resources(cpus=8.0)}, None, {"quota.cpu.max"}),
        ({"resources": resources(cpus=float("nan"))}, None, {"quota.cpu.max"}),
        ({"resources": resources(cpus=float("inf"))}, None, {"quota.cpu.max"}),
        ({"resources": resources(memory=1024 * MIB)}, None, {"quota.memory.max"}),
        ({"resources": resources(memory=-1)}, None, {"quota.memory.max"}),
        ({"resources": resources(memory_swap=-1)}, None, {"quota.memory_swap.max"}),
        ({"resources": resources(memory_swap=2048 * MIB)}, None, {"quota.memory_swap.max"}),
        ({"resources": resources(memory_swap=-1)}, {"quotas": {"max_memory_swap": "unlimited"}}, set()),
        ({"resources": resources(pids=5000)}, None, {"quota.pids.max"}),
        ({"resources": resources(pids=-1)}, None, {"quota.pids.max"}),
        # images
        ({"image": "Not An Image"}, None, {"image.invalid"}),
        ({"image": "busybox:latest"}, None, {"image.latest_tag"}),
        ({"image": "busybox"}, None, {"image.latest_tag"}),
        ({"image": "localhost:5000/busybox"}, None, {"image.latest_tag"}),
        ({"image": "localhost:5000/busybox:1.36"}, None, set()),
        ({"image": "busybox:latest"}, {"images": {"allow_latest": True}}, set()),
        ({"image": f"busybox@{DIGEST}"}, None, set()),
        ({}, {"images": {"require_digest": True}}, {"image.digest_required"}),
        ({"image": f"busybox:1.36@{DIGEST}"}, {"images": {"require_digest": True}}, set()),
        ({}, {"images": {"denied": ["busybox"]}}, {"image.denied"}),
        ({}, {"images": {"denied": ["docker.io/library/*"]}}, {"image.denied"}),
        ({}, {"images": {"allowed": ["ghcr.io/org/*"]}}, {"image.not_allowed"}),
        ({"image": "ghcr.io/org/app:1"}, {"images": {"allowed": ["ghcr.io/org/*"]}}, set()),
        (
            {"image": "ghcr.io/org/app:1"},
            {"images": {"allowed": ["*"], "denied": ["ghcr.io/org/app"]}},
            {"image.denied"},
        ),
        ({"image": "registry:5000/ns/img:1"}, {"images": {"allowed": ["registry:5000/*"]}}, set()),
        (
            {"image": "registry:5001/ns/img:1"},
            {"images": {"allowed": ["registry:5000/*"]}},
            {"image.not_allowed"},
        ),
        # mounts
        ({"mounts": [Mount(type="bind", source="/srv", target="/srv")]}, None, {"mount.bind.disabled"}),
        (
            {"mounts": [Mount(type="bind", source="/srv", target="/srv")]},
            {"mounts": {"allow_bind": True}},
            {"mount.bind.source_not_allowed"},
        ),
        (
            {"mounts": [Mount(type="bind", source="srv", target="/srv")]},
            {"mounts": {"allow_bind": True}},
            {"mount.bind.source_invalid"},
        ),
        (
            {"mounts": [Mount(type="bind", source="/home/a/.aws", target="/x")]},
            {"mounts": {"allow_bind": True, "allowlist": [{"path": "/", "mode": "readwrite"}]}},
            {"mount.bind.blocked"},
        ),
        (
            {"mounts": [Mount(type="bind", source="/home/a/.cache", target="/x")]},
            {
                "mounts": {
                    "allow_bind": True,
                    "allowlist": [{"path": "/", "mode": "readwrite"}],
                    "blocked_patterns": [".cache"],
                }
            },
            {"mount.bind.blocked"},
        ),
        (
            {"mounts": [Mount(type="volume", source="data", target="/data")]},
            {"mounts": {"allow_volumes": False}},
            {"mount.volume.disabled"},
        ),
        (
            {"mounts": [Mount(type="volume", source="data", target="/data")]},
            {"mounts": {"denied_volumes": ["d*"]}},
            {"mount.volume.not_allowed"},
        ),
        (
            {"mounts": [Mount(type="volume", source="data", target="/data")]},
            {"mounts": {"allowed_volumes": ["baaaht-*"]}},
            {"mount.volume.not_allowed"},
        ),
        (
            {"mounts": [Mount(type="volume", source="baaaht-x", target="/data")]},
            {"mounts": {"allowed_volumes": ["baaaht-*"]}},
            set(),
        ),
        # An anonymous volume outlives its container unlabelled: only allowing every volume allows it.
        ({"mounts": [Mount(type="volume", target="/data")]}, None, {"mount.volume.not_allowed"}),
        (
            {"mounts": [Mount(type="volume", target="/data")]},
            {"mounts": {"allowed_volumes": ["baaaht-*"]}},
            {"mount.volume.not_allowed"},
        ),
        ({"mounts": [Mount(type="volume", target="/data")]}, {"mounts": {"allowed_volumes": ["*"]}}, set()),
        ({}, {"mounts": {"allow_tmpfs": False}}, {"mount.tmpfs.disabled"}),
        (
            {"mounts": [Mount(type="tmpfs", target="/tmp", tmpfs_size=1024 * MIB)]},
            None,
            {"mount.tmpfs.size_exceeded"},
        ),
        (
            {"mounts": [Mount(type="tmpfs", target="/tmp", tmpfs_size=-5)]},
            None,
            {"mount.tmpfs.size_exceeded"},
        ),
        # network
        ({"network_mode": "bridge"}, None, {"network.disabled"}),
        ({"network_mode": "", "networks": ["backend"]}, None, {"network.disabled"}),
        ({"network_mode": "host"}, None, {"network.host"}),
        ({"network_mode": "host"}, NETWORKED, {"network.host"}),
        ({"network_mode": "host"}, {"network": {"allow_network": True, "allow_host_network": True}}, set()),
        ({"network_mode": "container:abc"}, NETWORKED, {"network.container_mode"}),
        ({"network_mode": "bridge"}, NETWORKED, set()),
        ({"network_mode": ""}, NETWORKED, set()),
        (
            {"network_mode": "bridge"},
            {"network": {"allow_network": True, "allowed_networks": ["backend-*"]}},
            {"network.not_allowed"},
        ),
        (
            {"network_mode": "", "networks": ["backend-1"]},
            {"network": {"allow_network": True, "allowed_networks": ["backend-*"]}},
            set(),
        ),
        (
            {"network_mode": "", "networks": ["backend-1"]},
            {"network": {"allow_network": True, "denied_networks": ["backend-1"]}},
            {"network.not_allowed"},
        ),
        ({"ports": [PortBinding(container_port=80)]}, None, {"network.ports.disabled"}),
        (
            {"network_mode": "bridge", "ports": [PortBinding(container_port=80)]},
            NETWORKED,
            {"network.ports.disabled"},
        ),
        (
            {"network_mode": "bridge", "ports": [PortBinding(container_port=80)]},
            {"network": {"allow_network": True, "allow_ports": True}},
            set(),
        ),
        (
            {"network_mode": "bridge", "ports": [PortBinding(container_port=80, host_ip="0.0.0.0")]},
            {"network": {"allow_network": True, "allow_ports": True}},
            {"network.ports.public"},
        ),
        (
            {"network_mode": "bridge", "ports": [PortBinding(container_port=80, host_ip="")]},
            {"network": {"allow_network": True, "allow_ports": True}},
            {"network.ports.public"},
        ),
        (
            {"network_mode": "bridge", "ports": [PortBinding(container_port=80, host_ip="::1")]},
            {"network": {"allow_network": True, "allow_ports": True}},
            set(),
        ),
        (
            {"network_mode": "bridge", "ports": [PortBinding(container_port=80, host_ip="0.0.0.0")]},
            {"network": {"allow_network": True, "allow_ports": True, "allow_public_ports": True}},
            set(),
        ),
        # security
        ({"privileged": True}, None, {"security.privileged"}),
        ({"privileged": True}, {"security": {"allow_privileged": True}}, set()),
        ({"user": "0"}, None, {"security.root"}),
        ({"user": "00:1000"}, None, {"security.root"}),
        ({"user": "0:0"}, None, {"security.root", "security.root_group"}),
        ({"user": "root"}, None, {"security.root"}),
        ({"user": "root:root"}, None, {"security.root", "security.root_group"}),
        ({"user": ""}, None, set()),  # unset: the policy's default user
        ({"user": "nobody"}, None, {"security.non_root_required"}),
        ({"user": "app:1000"}, None, {"security.non_root_required"}),
        ({"user": "nobody"}, {"security": {"require_non_root": False}}, set()),
        ({"user": "0"}, {"security": {"allow_root": True, "require_non_root": False}}, set()),
        ({"user": "1001:1000"}, {"security": {"allowed_uids": [1000]}}, {"security.uid.not_allowed"}),
        (
            {"user": "app"},
            {"security": {"allowed_uids": [1000], "require_non_root": False}},
            {"security.uid.not_allowed"},
        ),
        ({"user": "1000"}, {"security": {"allowed_gids": [1000]}}, {"security.gid.not_allowed"}),
        (
            {"group_add": ["0"]},
            {"security": {"allowed_gids": [1000]}},
            {"security.gid.not_allowed", "security.root_group"},
        ),
        ({"user": "1000:0"}, None, {"security.root_group"}),
        ({"group_add": ["0"]}, None, {"security.root_group"}),
        ({"group_add": ["root"]}, None, {"security.root_group"}),
        ({"group_add": ["docker"]}, None, {"security.group_name"}),
        ({"user": "1000:docker"}, None, {"security.group_name"}),
        ({"group_add": ["0"]}, {"security": {"allow_root_group": True}}, set()),
        ({"group_add": ["docker"]}, {"security": {"allow_group_names": True}}, set()),
        ({"group_add": ["4242"]}, None, set()),
        ({"group_add": ["1000"]}, {"security": {"allowed_uids": [1000], "allowed_gids": [1000]}}, set()),
        ({"cap_add": ["SYS_ADMIN"]}, None, {"security.capability.not_allowed"}),
        (
            {"cap_add": ["NET_RAW"]},
            {"security": {"allowed_capabilities": ["NET_BIND_SERVICE"]}},
            {"security.capability.not_allowed"},
        ),
        (
            {"cap_add": ["cap_net_bind_service"]},
            {"security": {"allowed_capabilities": ["NET_BIND_SERVICE"]}},
            set(),
        ),
        (
            {"cap_add": ["ALL"]},
            {"security": {"allowed_capabilities": ["NET_BIND_SERVICE"]}},
            {"security.capability.not_allowed"},
        ),
        ({"security_opt": ["no-new-privileges:false"]}, None, {"security.no_new_privileges.required"}),
        ({"security_opt": ["no-new-privileges=false"]}, None, {"security.no_new_privileges.required"}),
        (
            {"security_opt": ["no-new-privileges:true", "no-new-privileges:false"]},
            None,
            {"security.no_new_privileges.required"},
        ),
        (
            {"security_opt": ["no-new-privileges:false"]},
            {"security": {"require_no_new_privileges": False}},
            set(),
        ),
        ({"security_opt": ["no-new-privileges", "seccomp=unconfined"]}, None, {"security.security_opt"}),
        ({"security_opt": ["no-new-privileges", "apparmor:unconfined"]}, None, {"security.security_opt"}),
        (
            {"security_opt": ["no-new-privileges", "label=disable"]},
            {"security": {"allow_security_opt": True}},
            set(),
        ),
        ({"read_only_rootfs": False}, None, {"security.readonly_rootfs.required"}),
        ({"read_only_rootfs": False}, {"security": {"require_read_only_rootfs": False}}, set()),
    ],
)
def test_rules(changes, data, expected):
    assert rules(evaluate(changes, data)) == expected


def test_root_is_judged_from_the_user_never_from_labels():
    disguised = evaluate({"user": "0", "labels": {"user": "1000", "privileged": "false", "username": "bob"}})
    assert rules(disguised) == {"security.root"}
    harmless = evaluate({"labels": {"user": "root", "privileged": "true", "username": "root"}})
    assert harmless.allowed and rules(harmless) == set()


def test_the_principal_not_a_label_picks_allowlist_entries(tmp_path):
    (tmp_path / "shared").mkdir()
    data = {
        "mounts": {
            "allow_bind": True,
            "allowlist": [{"path": str(tmp_path.resolve()), "mode": "readwrite", "user": "alice"}],
        }
    }
    mount = [Mount(type="bind", source=str(tmp_path / "shared"), target="/shared")]
    assert evaluate({"mounts": mount}, data).allowed
    bob = Principal(user="bob")
    assert rules(evaluate({"mounts": mount, "labels": {"username": "alice"}}, data, principal=bob)) == {
        "mount.bind.source_not_allowed"
    }


@pytest.mark.parametrize(
    "counts, expected",
    [
        (engine.Counts(host=9, session=0), set()),
        (engine.Counts(host=10, session=0), {"quota.containers.host"}),
        (engine.Counts(host=1, session=2), {"quota.containers.session"}),
        (engine.Counts(), set()),
    ],
)
def test_container_counts(counts, expected):
    data = {"quotas": {"max_containers_per_session": 2}}
    assert rules(evaluate(None, data, counts=counts)) == expected


@pytest.mark.parametrize(
    "value, rule",
    [
        ({"resources": resources(cpus=0.001)}, "quota.cpu.min"),
        ({"resources": resources(memory=MIB, memory_swap=MIB)}, "quota.memory.min"),
    ],
)
def test_values_below_minimums_are_warnings(value, rule):
    judgement = evaluate(value, {"quotas": {"min_cpus": 0.5}})
    assert judgement.allowed and [w.rule for w in judgement.warnings] == [rule]


def test_a_violation_names_the_field_the_value_and_the_limit():
    (violation,) = evaluate({"resources": resources(memory=1024 * MIB)}).violations
    assert (violation.rule, violation.field, violation.value, violation.limit) == (
        "quota.memory.max",
        "resources.memory",
        "1GiB",
        "512MiB",
    )


# --- modes -------------------------------------------------------------------------------------

BAD = {"privileged": True, "user": "0", "image": "busybox"}


def test_strict_denies_any_violation():
    judgement = evaluate(BAD)
    assert (judgement.outcome, judgement.allowed) == ("deny", False)
    assert rules(judgement) == {"security.privileged", "security.root", "image.latest_tag"}
    assert judgement.summary.startswith("denied by image.latest_tag, security.privileged, security.root")


def test_permissive_allows_and_reports_every_violation():
    judgement = evaluate(BAD, {"mode": "permissive"})
    assert (judgement.outcome, judgement.allowed) == ("permissive", True)
    assert rules(judgement) == {"security.privileged", "security.root", "image.latest_tag"}
    assert judgement.enforced.privileged  # permissive reports, it does not rewrite explicit requests


def test_disabled_allows_without_checking_and_only_fills_what_is_unset():
    explicit = Resources(cpus=8.0, memory=1024 * MIB, memory_swap=2048 * MIB, pids=5000)
    spec_changes = {**BAD, "resources": explicit}
    judgement = evaluate(spec_changes, {"mode": "disabled"})
    assert (judgement.outcome, judgement.allowed, judgement.violations) == ("disabled", True, [])
    assert judgement.enforced == msgspec.structs.replace(SAFE, **spec_changes)


# --- the enforced spec -------------------------------------------------------------------------


def test_unset_fields_are_filled_from_the_policy():
    bare = ContainerSpec(image="busybox:1.36", user="1000:1000", mounts=[Mount(type="tmpfs", target="/tmp")])
    judgement = engine.evaluate(bare, ALICE, effective(), HostPaths())
    enforced = judgement.enforced
    assert judgement.allowed
    assert enforced.resources == Resources(cpus=1.0, memory=512 * MIB, memory_swap=512 * MIB, pids=256)
    assert enforced.mounts[0].tmpfs_size == 256 * MIB
    assert enforced.read_only_rootfs is True
    assert enforced.network_mode == "none"
    assert enforced.cap_drop == ["ALL"]
    assert enforced.security_opt == ["no-new-privileges:true"]
    assert {check.rule for check in judgement.checks if check.outcome == "enforce"} >= {
        "quota.memory.default",
        "network.disabled",
        "security.capability.drop",
    }
    msgspec.msgpack.encode(enforced)  # plain values only: it goes back over the bus


def test_unset_swap_means_no_swap_even_when_the_policy_allows_unlimited():
    unlimited = {"quotas": {"max_memory_swap": "unlimited"}}
    judgement = evaluate({"resources": resources(memory_swap=0)}, unlimited)
    assert judgement.enforced.resources.memory_swap == SAFE.resources.memory
    assert evaluate({"resources": resources(memory_swap=-1)}, unlimited).enforced.resources.memory_swap == -1


def test_a_read_only_allowlist_entry_downgrades_the_mount_with_a_warning(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "data")
    data = {
        "mounts": {"allow_bind": True, "allowlist": [{"path": str(tmp_path.resolve()), "mode": "readonly"}]}
    }
    judgement = evaluate({"mounts": [Mount(type="bind", source=str(tmp_path / "link"), target="/d")]}, data)
    assert judgement.allowed
    mount, tmp = judgement.enforced.mounts
    assert (tmp.type, tmp.target) == ("tmpfs", "/tmp")  # the default for a read-only root filesystem
    assert mount.read_only and mount.source == str(
        (tmp_path / "data").resolve()
    )  # what was judged is mounted
    assert [w.rule for w in judgement.warnings] == ["mount.bind.readonly"]


def test_the_agent_bus_mount_passes_even_with_bind_mounts_off(tmp_path):
    agent = tmp_path / "run" / "agent"
    agent.mkdir(parents=True)
    host = HostPaths(protected=(str(tmp_path / "run"),), system_mounts=(str(agent),))
    mounts = [*SAFE.mounts, Mount(type="bind", source=str(agent), target="/run/baaaht")]
    judgement = evaluate({"mounts": mounts}, host=host)
    assert judgement.allowed and judgement.enforced.mounts[1].read_only


def test_capabilities_always_dropped_are_added():
    judgement = evaluate({"cap_drop": ["NET_RAW"]}, {"security": {"drop_capabilities": ["ALL", "NET_RAW"]}})
    assert judgement.enforced.cap_drop == ["NET_RAW", "ALL"]


def test_explain_trace_lists_passes_too():
    checks = evaluate().checks
    assert {check.outcome for check in checks} == {"pass"}
    assert {"image.not_allowed", "security.root", "security.privileged"} <= {check.rule for check in checks}
