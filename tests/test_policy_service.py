"""PolicyService called directly: a real policy file and audit log under tmp_path, a fake bus."""

from __future__ import annotations

import contextlib
import errno
import inspect
import os
import threading

import msgspec
import pytest

from baaaht.bus.testing import (
    FakeBus,
    agent_caller,
    context,
    error_of,
    operator_caller,
    service_caller,
    serving,
    wait_for,
)
from baaaht.common.policy.document import HostDefaults
from baaaht.schemas.base import target_of
from baaaht.schemas.containers import ContainerSpec, Resources
from baaaht.schemas.errors import ErrorCode
from baaaht.schemas.policy import (
    PolicyAuditTail,
    PolicyAuditVerify,
    PolicyEvaluate,
    PolicyEvaluateExec,
    PolicyExplain,
    PolicyGet,
    PolicyReload,
    PolicyReloaded,
    PolicyReloadFailed,
    PolicyValidate,
    PolicyViolation,
    Principal,
)
from baaaht.services.policy import audit
from baaaht.services.policy.mounts import HostPaths
from baaaht.services.policy.service import PolicyFile, PolicyService

DEFAULTS = HostDefaults(max_memory=512 * 1024 * 1024, max_containers=10)
SPEC = ContainerSpec(
    image="busybox:1.36",
    user="1000:1000",
    read_only_rootfs=True,
    network_mode="none",
    env={"API_KEY": "hunter2-secret-value"},
    resources=Resources(pids=150),
)
ALICE = Principal(user="alice", session_id="s1", role="agent")
PIDS_100 = "mode: strict\nquotas:\n  max_pids: 100\n"
PIDS_200 = "mode: strict\nquotas:\n  max_pids: 200\n"


class World:
    def __init__(self, tmp_path, text: str | None = None):
        self.policy_path = tmp_path / "policy.yaml"
        if text is not None:
            self.policy_path.write_text(text)
        self.audit_path = tmp_path / "data" / "audit" / "policy.jsonl"
        self.bus = FakeBus()
        self.service: PolicyService | None = None
        self.serving = contextlib.ExitStack()

    def make(self, reload_interval: float = 0.05) -> PolicyService:
        return PolicyService(
            PolicyFile(str(self.policy_path)),
            self.audit_path,
            DEFAULTS,
            HostPaths(),
            events=self.bus,
            reload_interval=reload_interval,
        )

    def start(self, service: PolicyService) -> PolicyService:
        """What the runner does: on_start, then the background work."""
        self.stop()
        self.service = self.serving.enter_context(serving(service))
        return service

    def stop(self) -> None:
        self.serving.close()
        self.service = None

    def write(self, text: str) -> None:
        partial = self.policy_path.with_suffix(".tmp")
        partial.write_text(text)
        os.replace(partial, self.policy_path)  # what editors and config tools do

    def records(self):
        return audit.read_tail(self.audit_path, 1000)[0]


@pytest.fixture
def world(tmp_path):
    made = World(tmp_path)
    yield made
    made.stop()


def started(world: World, text: str | None = None, reload_interval: float = 0.05) -> PolicyService:
    if text is not None:
        world.write(text)
    return world.start(world.make(reload_interval))


def test_without_a_file_the_builtin_policy_is_in_force(world):
    service = started(world)
    info = service.get(PolicyGet(), context())
    assert (info.source, info.mode) == ("built-in", "strict")
    assert service.health_report() == (True, "")
    assert not world.policy_path.exists()  # never auto-written
    (event,) = world.bus.events(PolicyReloaded)
    assert (event.version, event.previous_version) == (info.version, "")


def test_the_policy_is_loaded_and_announced_at_start_not_in_the_constructor(world):
    """The runner reports the service healthy only once `on_start` returned."""
    world.write(PIDS_100)
    service = world.make()
    assert world.bus.published == [] and not world.audit_path.exists()
    world.start(service)
    assert service.health_report() == (True, "")
    assert [type(event) for _, event in world.bus.published] == [PolicyReloaded]
    assert [(r.action, r.decision) for r in world.records()] == [("policy.reload", "applied")]


def test_every_decision_is_audited_without_environment_values(world):
    service = started(world, PIDS_200)
    decision = service.evaluate(PolicyEvaluate(spec=SPEC, principal=ALICE), context())
    assert decision.allowed and decision.outcome == "allow"
    (reload, record) = world.records()
    assert (reload.action, reload.decision) == ("policy.reload", "applied")
    assert (record.decision_id, record.action, record.decision) == (
        decision.decision_id,
        "container.create",
        "allow",
    )
    assert (record.principal, record.image, record.env_names) == (ALICE, "busybox:1.36", ["API_KEY"])
    assert record.policy_version == decision.policy_version and record.resource.startswith("sha256:")
    assert b"hunter2" not in world.audit_path.read_bytes()
    assert world.bus.events(PolicyViolation) == []


def test_a_denial_is_audited_and_published(world):
    service = started(world, PIDS_100)
    decision = service.evaluate(PolicyEvaluate(spec=SPEC, principal=ALICE), context())
    assert (decision.allowed, decision.outcome) == (False, "deny")
    assert [v.rule for v in decision.violations] == ["quota.pids.max"]
    assert (world.records()[-1].decision, world.records()[-1].rules) == ("deny", ["quota.pids.max"])
    (event,) = world.bus.events(PolicyViolation)
    assert (event.decision_id, event.outcome, event.rules) == (
        decision.decision_id,
        "deny",
        ["quota.pids.max"],
    )


def test_permissive_violations_are_published_and_audited_as_such(world):
    service = started(world, PIDS_100.replace("strict", "permissive"))
    decision = service.evaluate(PolicyEvaluate(spec=SPEC, principal=ALICE), context())
    assert (decision.allowed, decision.outcome) == (True, "permissive")
    assert world.records()[-1].decision == "permissive"
    assert world.bus.events(PolicyViolation)[0].outcome == "permissive"


def test_disabled_is_audited_as_disabled(world):
    service = started(world, "mode: disabled\n")
    decision = service.evaluate(PolicyEvaluate(spec=SPEC, principal=ALICE), context())
    assert (decision.allowed, decision.outcome) == (True, "disabled")
    assert world.records()[-1].decision == "disabled"


def test_session_overrides_tighten_and_report_refusals(world):
    service = started(world, PIDS_200)
    override = {"quotas": {"max_pids": 120}, "security": {"allow_privileged": True}}
    decision = service.evaluate(PolicyEvaluate(spec=SPEC, principal=ALICE, override=override), context())
    assert [v.rule for v in decision.violations] == ["quota.pids.max"]
    assert [(w.rule, w.field) for w in decision.warnings] == [
        ("policy.override.refused", "security.allow_privileged")
    ]
    assert "+" in decision.policy_version
    error = error_of(
        lambda: service.evaluate(PolicyEvaluate(spec=SPEC, override={"quotas": {"max_pid": 1}}), context())
    )
    assert error.code == ErrorCode.INVALID_ARGUMENT and "quotas.max_pid: unknown field" in error.message
    info = service.get(
        PolicyGet(override={"images": {"allowed": ["ghcr.io/*"]}, "mode": "disabled"}), context()
    )
    assert info.narrowing == {"images.allowed": ["ghcr.io/*"]}
    assert [r.path for r in info.refused] == ["mode"] and info.mode == "strict"


def test_a_bad_file_at_start_fails_closed_until_fixed(world):
    service = started(world, "mode: strict\nquotas: {max_pids: 0}\n")
    healthy, reason = service.health_report()
    assert not healthy and "quotas.max_pids" in reason
    error = error_of(lambda: service.evaluate(PolicyEvaluate(spec=SPEC), context()))
    assert error.code == ErrorCode.UNAVAILABLE and "quotas.max_pids" in error.message
    (failure,) = world.bus.events(PolicyReloadFailed)
    assert [e.path for e in failure.errors] == ["quotas.max_pids"]
    world.write(PIDS_200)
    world.bus.wait_for_events(PolicyReloaded, what="the fixed file to be loaded")
    assert service.health_report() == (True, "")
    assert service.evaluate(PolicyEvaluate(spec=SPEC), context()).allowed


def test_a_bad_reload_keeps_the_policy_in_force(world):
    service = started(world, PIDS_200)
    version = service.get(PolicyGet(), context()).version
    world.write("mode: strict\nquotas:\n  max_pids: 200\n  mystery: 1\n")
    error = error_of(lambda: service.reload(PolicyReload(), context()))
    assert error.code == ErrorCode.INVALID_ARGUMENT
    assert error.details["errors"] == [{"path": "quotas.mystery", "message": "unknown field"}]
    assert service.get(PolicyGet(), context()).version == version
    assert service.evaluate(PolicyEvaluate(spec=SPEC), context()).allowed
    assert service.health_report() == (True, "")
    assert world.records()[-1].decision == "allow"
    assert any(r.action == "policy.reload" and r.decision == "refused" for r in world.records())


@pytest.mark.parametrize("break_file", ["directory", "not utf-8"])
def test_an_unreadable_file_is_refused_never_taken_for_a_missing_one(world, break_file):
    service = started(world, PIDS_100)
    version = service.get(PolicyGet(), context()).version
    world.policy_path.unlink()
    if break_file == "directory":
        world.policy_path.mkdir()
    else:
        world.policy_path.write_bytes(b"mode: \xff\xfe\n")
    error = error_of(lambda: service.reload(PolicyReload(), context()))
    assert error.code == ErrorCode.INVALID_ARGUMENT and "cannot be read" in error.message
    assert (
        service.get(PolicyGet(), context()).version == version
        and service.get(PolicyGet(), context()).source != "built-in"
    )


def test_file_changes_are_picked_up_by_polling(world):
    service = started(world, PIDS_100)
    first = service.get(PolicyGet(), context()).version
    world.write(PIDS_200)
    # The new policy is in force a moment before its event is published: wait on the event.
    world.bus.wait_for_events(PolicyReloaded, count=2, what="the changed file to be loaded")
    assert service.get(PolicyGet(), context()).version != first
    assert service.evaluate(PolicyEvaluate(spec=SPEC), context()).allowed
    reloaded = world.bus.events(PolicyReloaded)[-1]
    assert reloaded.previous_version == first
    world.policy_path.unlink()
    world.bus.wait_for_events(PolicyReloaded, count=3, what="the built-in policy after removal")
    assert service.get(PolicyGet(), context()).source == "built-in"


def test_the_reload_hook_reloads_at_once(world):
    """The runner calls it on SIGHUP (tests/test_policy_bus.py sends the signal to the process)."""
    service = started(world, PIDS_100, reload_interval=3600.0)  # no polling to speak of
    first = service.get(PolicyGet(), context()).version
    world.write(PIDS_200)
    service.on_reload()
    assert service.get(PolicyGet(), context()).version != first
    assert world.bus.events(PolicyReloaded)[-1].previous_version == first


def test_reload_answers_with_the_versions(world):
    service = started(world, PIDS_100)
    first = service.get(PolicyGet(), context()).version
    same = service.reload(PolicyReload(), context())
    assert (same.changed, same.version, same.source) == (False, first, str(world.policy_path))
    world.write(PIDS_200)
    changed = service.reload(PolicyReload(), context())
    assert (changed.changed, changed.previous_version) == (True, first)


def more_decisions(decisions: list, seen: int):
    return lambda: len(decisions) > seen + 5


def test_no_request_sees_a_half_loaded_policy(world):
    """While two policies swap back and forth, every decision matches the version it names."""
    service = started(world, PIDS_100)
    strict_version = service.get(PolicyGet(), context()).version
    stop = threading.Event()
    decisions = []

    def evaluate_forever():
        while not stop.is_set():
            decisions.append(service.evaluate(PolicyEvaluate(spec=SPEC), context()))

    workers = [threading.Thread(target=evaluate_forever) for _ in range(4)]
    for worker in workers:
        worker.start()
    try:
        for text in [PIDS_200, PIDS_100, "mode: [broken", PIDS_200, PIDS_100] * 3:
            world.write(text)
            service.reload_quietly(force=True)
            wait_for(more_decisions(decisions, len(decisions)), what="decisions under the new policy")
    finally:
        stop.set()
        for worker in workers:
            worker.join(30)
    assert len({d.policy_version for d in decisions}) == 2
    for decision in decisions:
        assert decision.allowed == (decision.policy_version != strict_version)
    assert audit.verify(world.audit_path).ok


def test_no_decision_without_an_audit_record(world):
    world.audit_path.parent.mkdir(parents=True)
    world.audit_path.write_bytes(b'{"seq":1,"not":"a record"}\n')
    service = started(world, PIDS_200)
    healthy, reason = service.health_report()
    assert not healthy and "audit log unusable" in reason
    error = error_of(lambda: service.evaluate(PolicyEvaluate(spec=SPEC), context()))
    assert error.code == ErrorCode.UNAVAILABLE and "no decision is made without a record" in error.message
    world.audit_path.rename(world.audit_path.with_suffix(".jsonl.bad"))  # the operator moves it aside
    assert service.health_report() == (True, "")  # found at the next heartbeat: no restart needed
    assert service.evaluate(PolicyEvaluate(spec=SPEC), context()).allowed


def test_a_failed_audit_write_leaves_no_half_line_and_heals(world, monkeypatch):
    service = started(world, PIDS_200)
    audit_fd = service._audit._fd
    real_write = os.write

    def disk_fills_up(fd, data):
        if fd != audit_fd:
            return real_write(fd, data)
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", disk_fills_up)
    error = error_of(lambda: service.evaluate(PolicyEvaluate(spec=SPEC), context()))
    assert error.code == ErrorCode.UNAVAILABLE and "No space left on device" in error.message
    monkeypatch.setattr(os, "write", real_write)
    assert world.audit_path.read_bytes().endswith(b"\n")  # the half line was taken back at once
    assert service.health_report() == (True, "")
    decision = service.evaluate(PolicyEvaluate(spec=SPEC), context())
    assert world.records()[-1].decision_id == decision.decision_id
    assert audit.verify(world.audit_path).ok


def test_a_restarted_service_continues_the_chain(world):
    service = started(world, PIDS_200)
    service.evaluate(PolicyEvaluate(spec=SPEC), context())
    world.stop()
    started(world).evaluate(PolicyEvaluate(spec=SPEC), context())
    report = audit.verify(world.audit_path)
    assert (report.ok, report.records) == (True, 4)  # each process start audits the policy it loads


def test_explain_is_not_audited(world):
    service = started(world, PIDS_100)
    before = len(world.records())
    explanation = service.explain(PolicyExplain(spec=SPEC, principal=ALICE), context())
    assert explanation.summary.startswith("denied by quota.pids.max")
    assert explanation.decision.outcome == "deny" and explanation.decision.decision_id == ""
    assert any(c.rule == "quota.pids.max" and c.outcome == "violation" for c in explanation.checks)
    assert len(world.records()) == before


def test_validate(world, tmp_path):
    service = started(world, PIDS_200)
    good = service.validate(PolicyValidate(text=PIDS_100), context())
    assert good.valid and good.version and good.errors == []
    bad = service.validate(PolicyValidate(text="mode: lax\nimages: {allowed: ['Bad Image']}\n"), context())
    assert not bad.valid and [e.path for e in bad.errors] == ["mode"]
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    linked = service.validate(
        PolicyValidate(
            text=msgspec.json.encode(
                {"mounts": {"allowlist": [{"path": str(tmp_path / "link"), "mode": "readonly"}]}}
            ).decode()
        ),
        context(),
    )
    assert linked.valid and linked.warnings[0].path == "mounts.allowlist[0].path"
    tighter = service.validate(PolicyValidate(text="quotas: {max_pids: 50}\n", as_override=True), context())
    assert tighter.valid
    looser = service.validate(PolicyValidate(text="quotas: {max_pids: 5000}\n", as_override=True), context())
    assert not looser.valid and [e.path for e in looser.errors] == ["quotas.max_pids"]
    unknown = service.validate(PolicyValidate(text="{max_memory: 64GB}", as_override=True), context())
    assert not unknown.valid and unknown.errors[0].message == "unknown field"


# -- who asked, on whose behalf ------------------------------------------------------------------


@pytest.mark.parametrize("role", ["agent", "assistant", "worker", "unidentified"])
def test_an_agent_can_never_write_a_principal_into_the_audit_log(world, role):
    service = started(world)
    before = world.records()
    forged = Principal(user="operator-forged-by-agent", role="operator")
    agent = context(caller=agent_caller("s1", role))
    requests = [
        PolicyEvaluate(spec=SPEC, principal=forged),
        PolicyEvaluate(spec=SPEC),
        PolicyEvaluateExec(container_id="a" * 64, command=["true"], principal=forged),
        PolicyExplain(spec=SPEC, principal=forged),
        PolicyGet(),
        PolicyReload(),
        PolicyValidate(text=PIDS_100),
        PolicyAuditVerify(),
        PolicyAuditTail(),
    ]
    assert {type(r) for r in requests} == {s.request_type for s in PolicyService.rpcs().values()}
    for request in requests:
        handler = getattr(service, PolicyService.rpcs()[target_of(type(request))].method)
        error = error_of(lambda handler=handler, request=request: list_if_stream(handler(request, agent)))
        assert error.code is ErrorCode.PERMISSION_DENIED
        assert f"{role} callers may not call policy." in error.message
    assert world.records() == before
    assert b"forged" not in world.audit_path.read_bytes()
    assert world.bus.events(PolicyViolation) == []


def list_if_stream(result):
    return list(result) if inspect.isgenerator(result) else result


def test_the_audit_records_who_asked_and_on_whose_behalf(world):
    service = started(world, PIDS_100)  # SPEC asks for 150 pids: a violation, published too
    container_manager = service_caller("container")
    service.evaluate(PolicyEvaluate(spec=SPEC, principal=ALICE), context(caller=container_manager))
    record = world.records()[-1]
    assert (record.principal, record.asked_by) == (ALICE, container_manager)
    assert world.bus.events(PolicyViolation)[-1].asked_by == container_manager
    # Naming nobody, the caller asks for itself.
    operator = operator_caller(uid=1000)
    service.evaluate(PolicyEvaluate(spec=SPEC), context(caller=operator))
    record = world.records()[-1]
    assert record.principal == Principal(user="operator/uid=1000", role="operator")
    assert record.asked_by == operator
    assert audit.verify(world.audit_path).ok


def exec_request(**fields) -> PolicyEvaluateExec:
    return PolicyEvaluateExec(
        container_id="a" * 64, session_id="s1", image="busybox:1.36", command=["cat", "/secret"], **fields
    )


def test_exec_is_judged_for_the_containers_session_and_audited(world):
    service = started(world, PIDS_200)  # strict
    assistant = service_caller("scheduler")
    own = service.evaluate_exec(exec_request(principal=ALICE, env_names=["TOKEN"]), context(caller=assistant))
    assert (own.allowed, own.outcome) == (True, "allow")
    other = Principal(user="bob", session_id="s2", role="agent")
    denied = service.evaluate_exec(exec_request(principal=other), context(caller=assistant))
    assert (denied.allowed, denied.outcome) == (False, "deny")
    assert [v.rule for v in denied.violations] == ["exec.session"]
    # The host's own principals (no session) may exec anywhere.
    assert service.evaluate_exec(exec_request(), context(caller=operator_caller())).allowed
    first, second, third = world.records()[-3:]
    assert (first.action, first.decision, first.principal, first.asked_by) == (
        "container.exec",
        "allow",
        ALICE,
        assistant,
    )
    assert (first.container_id, first.image, first.env_names) == ("a" * 64, "busybox:1.36", ["TOKEN"])
    assert first.resource.startswith("sha256:") and b"/secret" not in world.audit_path.read_bytes()
    assert (second.decision, second.rules, second.principal) == ("deny", ["exec.session"], other)
    assert third.principal.role == "operator"
    (violation,) = world.bus.events(PolicyViolation)
    assert (violation.principal, violation.asked_by, violation.rules) == (other, assistant, ["exec.session"])
    assert audit.verify(world.audit_path).ok


def test_a_permissive_policy_lets_an_exec_outside_the_session_pass_and_records_it(world):
    service = started(world, "mode: permissive\n")
    other = Principal(user="bob", session_id="s2", role="agent")
    decision = service.evaluate_exec(exec_request(principal=other), context())
    assert (decision.allowed, decision.outcome) == (True, "permissive")
    assert world.records()[-1].rules == ["exec.session"]
