"""The policy service as a real process on a real broker: hot reload under load, SIGKILL and restart."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from baaaht.bus.errors import BusError
from baaaht.bus.testing import Recorded, next_event, wait_for
from baaaht.schemas.containers import ContainerSpec, Resources
from baaaht.schemas.errors import ErrorCode
from baaaht.schemas.policy import (
    PolicyEvaluate,
    PolicyGet,
    PolicyReload,
    PolicyReloaded,
    PolicyReloadFailed,
    PolicyViolation,
    Principal,
)
from baaaht.services.policy import audit

SPEC = ContainerSpec(
    image="busybox:1.36",
    user="1000:1000",
    read_only_rootfs=True,
    network_mode="none",
    resources=Resources(pids=150),
)
PIDS_100 = "mode: strict\nquotas:\n  max_pids: 100\n"
PIDS_200 = "mode: strict\nquotas:\n  max_pids: 200\n"
BROKEN = "mode: strict\nquotas:\n  max_pids: 200\n  max_pid: 1\n"
SERVICE = "baaaht.services.policy"


@pytest.fixture
def policy_host(make_host, tmp_path):
    policy_path = tmp_path / "policy.yaml"
    policy_path.write_text(PIDS_100)
    host = make_host({"policy": {"path": str(policy_path), "reload_interval": "100ms"}})
    host.policy_path = policy_path
    start_policy(host)
    return host


def start_policy(host) -> None:
    """Start the service and wait until it serves (it registers before its policy is loaded)."""
    host.start_service(SERVICE, "policy", service="policy")
    probe = host.client(timeout=1)
    wait_for(lambda: probe.call(PolicyGet()), what="the policy service to load its policy")


def replace_policy(path, text: str) -> None:
    partial = path.with_suffix(".tmp")
    partial.write_text(text)
    os.replace(partial, path)


def events(client, event_type, count: int) -> list:
    found = []
    with client.subscribe(["policy."], since=0) as subscription:
        while len(found) < count:
            delivery = subscription.next(timeout=10)
            assert delivery is not None, f"only {len(found)} {event_type.__name__} events arrived"
            if isinstance(delivery.event, event_type):
                found.append(delivery.event)
    return found


def test_decisions_violations_and_fail_closed_errors_over_the_bus(policy_host):
    client = policy_host.client()
    denied = client.call(PolicyEvaluate(spec=SPEC, principal=Principal(user="alice", session_id="s1")))
    assert (denied.allowed, [v.rule for v in denied.violations]) == (False, ["quota.pids.max"])
    (violation,) = events(client, PolicyViolation, 1)
    assert (violation.decision_id, violation.principal.user) == (denied.decision_id, "alice")
    with pytest.raises(BusError) as caught:
        client.call(PolicyEvaluate(spec=SPEC, override={"quotas": {"max_pidz": 1}}))
    assert caught.value.code == ErrorCode.INVALID_ARGUMENT and "quotas.max_pidz" in caught.value.message


def swap_under_load(host, client, decisions: Recorded, text: str, loads: bool) -> None:
    """Replace the policy file; wait until the new policy (or, for a bad file, its refusal) is in
    force and more decisions have been made."""
    before = client.call(PolicyGet()).version
    seen = len(decisions)
    if loads:
        with client.subscribe(["policy.reloaded"]) as reloads:
            replace_policy(host.policy_path, text)
            next_event(reloads, what="the new file to be loaded")
        assert client.call(PolicyGet()).version != before
    else:
        replace_policy(host.policy_path, text)
        with pytest.raises(BusError) as caught:
            client.call(PolicyReload())  # the poller refuses it too; this shows the reason
        assert "quotas.max_pid: unknown field" in caught.value.message
        assert client.call(PolicyGet()).version == before
    decisions.wait_for_count(seen + 11, what="decisions under the new policy")


def test_hot_reload_under_load(policy_host):
    """Valid and invalid files swap in while clients evaluate: every decision matches the version it
    names, an invalid file changes nothing, and each reload is announced."""
    client = policy_host.client()
    strict_version = client.call(PolicyGet()).version
    stop = threading.Event()
    decisions: Recorded = Recorded()
    failures = []

    def evaluate_forever():
        own = policy_host.client()
        while not stop.is_set():
            try:
                decisions.append(own.call(PolicyEvaluate(spec=SPEC)))
            except BusError as error:
                failures.append(error)

    workers = [threading.Thread(target=evaluate_forever) for _ in range(4)]
    for worker in workers:
        worker.start()
    try:
        for text, loads in [(PIDS_200, True), (BROKEN, False), (PIDS_100, True), (PIDS_200, True)]:
            swap_under_load(policy_host, client, decisions, text, loads)
    finally:
        stop.set()
        for worker in workers:
            worker.join(30)
    assert failures == []
    assert {d.policy_version for d in decisions} >= {strict_version}
    for decision in decisions:
        assert decision.allowed == (decision.policy_version != strict_version), decision
    reloaded = events(client, PolicyReloaded, 4)  # start, and three changes
    assert [e.previous_version for e in reloaded[1:]] == [e.version for e in reloaded[:-1]]
    (failed,) = events(client, PolicyReloadFailed, 1)
    assert [e.path for e in failed.errors] == ["quotas.max_pid"]
    assert audit.verify(policy_host.data_dir / "audit" / "policy.jsonl").ok


def test_sigkill_mid_load_and_restart_keep_the_chain(policy_host):
    acknowledged: Recorded[str] = Recorded()
    stop = threading.Event()

    def evaluate_forever():
        own = policy_host.client(timeout=2)
        while not stop.is_set():
            try:
                acknowledged.append(own.call(PolicyEvaluate(spec=SPEC)).decision_id)
            except BusError:
                pass  # the service is being killed: not acknowledged, so not promised

    workers = [threading.Thread(target=evaluate_forever) for _ in range(4)]
    for worker in workers:
        worker.start()
    try:
        acknowledged.wait_for_count(21, what="decisions before the kill")
        policy_host.kill("policy", signal.SIGKILL)
        start_policy(policy_host)
        count = len(acknowledged)
        acknowledged.wait_for_count(count + 21, what="decisions after the restart")
    finally:
        stop.set()
        for worker in workers:
            worker.join(30)
    log_path = policy_host.data_dir / "audit" / "policy.jsonl"
    report = audit.verify(log_path)
    assert report.ok, report.problems
    logged = {record.decision_id for record in map(audit.unseal, log_path.read_bytes().splitlines())}
    assert set(acknowledged) <= logged  # every decision a caller got was written first


def test_sighup_reloads(make_host, tmp_path):
    policy_path = tmp_path / "policy.yaml"
    policy_path.write_text(PIDS_100)
    host = make_host(
        {"policy": {"path": str(policy_path), "reload_interval": "1h"}}
    )  # no polling to speak of
    start_policy(host)
    client = host.client()
    assert not client.call(PolicyEvaluate(spec=SPEC)).allowed
    replace_policy(policy_path, PIDS_200)
    with client.subscribe(["policy.reloaded"]) as reloads:
        host.processes["policy"].send_signal(signal.SIGHUP)
        next_event(reloads, what="SIGHUP to load the new file")
    assert client.call(PolicyEvaluate(spec=SPEC)).allowed
