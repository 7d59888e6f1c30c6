"""One source of defaults: the policy document's, filled once by the policy engine for explain,
evaluate and create alike; a refused reload is published and shown by `policy.get` (8.10)."""

from __future__ import annotations

import pytest

from baaaht.bus.testing import context
from baaaht.common.policy import document
from baaaht.common.policy.document import DocumentError, HostDefaults
from baaaht.schemas.containers import ContainerSpec, Mount, Resources
from baaaht.schemas.policy import (
    PolicyEvaluate,
    PolicyExplain,
    PolicyGet,
    PolicyReloadFailed,
    Principal,
)
from baaaht.services.policy import defaults, engine, overrides
from baaaht.services.policy.mounts import HostPaths
from tests.test_policy_service import World, started

MIB = 1024 * 1024
HOST = HostDefaults(max_memory=512 * MIB, max_containers=10)
BARE = ContainerSpec(image="x:1")


def judge(spec: ContainerSpec, data: dict | None = None) -> engine.Judgement:
    loaded = document.LoadedPolicy.of(document.load(data or {}, HOST), "test", 0.0)
    policy, _refused = overrides.tighten(loaded, {})
    return engine.evaluate(spec, Principal(), policy, HostPaths())


def test_a_bare_spec_is_allowed_by_the_builtin_policy_and_runs_hardened():
    judgement = judge(BARE)
    assert (judgement.allowed, judgement.violations) == (True, [])
    enforced = judgement.enforced
    assert enforced.user == "1000:1000" and enforced.read_only_rootfs is True and enforced.init is True
    assert enforced.resources == Resources(cpus=1.0, memory=512 * MIB, memory_swap=512 * MIB, pids=256)
    assert enforced.mounts == [Mount(type="tmpfs", target="/tmp", tmpfs_size=256 * MIB)]
    assert enforced.network_mode == "none" and enforced.cap_drop == ["ALL"]
    assert enforced.security_opt == ["no-new-privileges:true"]
    filled = {check.rule for check in judgement.checks if check.outcome == "enforce"}
    assert {
        "security.user.default",
        "quota.pids.default",
        "mount.tmpfs.default",
        "runtime.init.default",
    } <= filled


def test_the_document_shows_the_defaults_that_apply():
    builtin = document.builtin(HOST)
    assert (builtin.quotas.default_pids, builtin.quotas.default_cpus) == (256, 1.0)
    assert builtin.security.default_user == "1000:1000"
    shown = document.to_data(builtin)
    assert shown["quotas"]["default_pids"] == 256 and shown["security"]["default_user"] == "1000:1000"


@pytest.mark.parametrize("mode", ["strict", "permissive", "disabled"])
def test_maximums_below_the_hardened_defaults_load_and_bound_them(mode):
    data = {"mode": mode, "quotas": {"max_pids": 100, "max_cpus": 0.5}}
    quotas = document.load(data, HOST).quotas
    assert (quotas.default_pids, quotas.default_cpus) == (100, 0.5)
    judgement = judge(BARE, data)
    assert (judgement.allowed, judgement.violations) == (True, [])
    assert (judgement.enforced.resources.pids, judgement.enforced.resources.cpus) == (100, 0.5)


def test_disabled_mode_still_fills_the_defaults():
    judgement = judge(BARE, {"mode": "disabled"})
    assert judgement.outcome == "disabled"
    assert judgement.enforced == judge(BARE).enforced


def test_no_default_tmp_where_the_policy_forbids_tmpfs():
    judgement = judge(BARE, {"mounts": {"allow_tmpfs": False}})
    assert judgement.allowed and judgement.enforced.mounts == []


def test_explicit_choices_are_kept_and_judged():
    explicit = ContainerSpec(
        image="x:1",
        user="0",
        read_only_rootfs=False,
        init=False,
        resources=Resources(cpus=0.5, memory=64 * MIB, pids=10),
        networks=["backend"],
        mounts=[Mount(type="volume", source="scratch", target="/tmp/")],
    )
    as_sent = defaults.copy(explicit)
    filled, _steps = defaults.fill(explicit, document.builtin(HOST))
    assert explicit == as_sent  # the caller's spec is never changed
    assert (filled.user, filled.read_only_rootfs, filled.init) == ("0", False, False)
    assert (filled.resources.cpus, filled.resources.pids, filled.network_mode) == (0.5, 10, "")
    assert filled.mounts == explicit.mounts  # a requested /tmp is not mounted over
    judgement = judge(explicit)
    assert {"security.root", "security.readonly_rootfs.required", "network.disabled"} <= {
        v.rule for v in judgement.violations
    }


@pytest.mark.parametrize(
    "security",
    [
        {"default_user": "agent"},
        {"default_user": "0:0"},
        {"default_user": "1000:0"},
        {"default_user": "1000:1000", "allowed_uids": [2000]},
        {"default_user": "1000", "allowed_gids": [1000]},
    ],
)
def test_a_default_user_the_policy_itself_would_refuse_is_refused_at_load(security):
    with pytest.raises(DocumentError) as caught:
        document.load({"security": security}, HOST)
    assert [error.path for error in caught.value.errors] == ["security.default_user"]


@pytest.fixture
def world(tmp_path):
    made = World(tmp_path, "mode: strict\n")
    yield made
    made.stop()


def test_explain_and_evaluate_fill_the_same_defaults(world):
    service = started(world)
    explanation = service.explain(PolicyExplain(spec=BARE), context())
    decision = service.evaluate(PolicyEvaluate(spec=BARE), context())
    assert explanation.decision.allowed and decision.allowed
    assert explanation.decision.enforced == decision.enforced == judge(BARE).enforced


def test_a_refused_reload_is_published_and_shown_by_policy_get(world):
    service = started(world)
    first = service.get(PolicyGet(), context())
    assert first.last_reload.ok and first.last_reload.source.endswith("policy.yaml")
    world.write("quotas:\n  max_pids: 0\n")
    world.bus.wait_for_events(PolicyReloadFailed, what="policy.reload_failed")
    (failed,) = world.bus.events(PolicyReloadFailed)
    assert failed.errors[0].path == "quotas.max_pids"
    info = service.get(PolicyGet(), context())
    assert info.version == first.version  # the policy before it stays in force
    last = info.last_reload
    assert (last.ok, last.version) == (False, first.version) and "quotas.max_pids" in last.error
    assert last.time >= first.last_reload.time and last.errors == failed.errors
