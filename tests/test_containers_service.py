"""The container service against written fakes of the engine, the policy and the session service."""

from __future__ import annotations

import concurrent.futures
import os
import threading

import msgspec
import pytest

from baaaht.bus.errors import BusError, unavailable
from baaaht.bus.testing import (
    FakeBus,
    ServiceHarness,
    agent_caller,
    code_of,
    context,
    error_of,
    operator_caller,
    serving,
    wait_for,
)
from baaaht.common.identity import IdentityStore
from baaaht.schemas import containers as c
from baaaht.schemas.bus import BusAgentsUpdate, BusAgentsUpdateResult
from baaaht.schemas.config import (
    AssistantConfig,
    BusConfig,
    Config,
    ContainerConfig,
    PolicyConfig,
    RuntimeConfig,
)
from baaaht.schemas.containers import (
    ContainerCreate,
    ContainerDestroy,
    ContainerExec,
    ContainerGet,
    ContainerHealthReport,
    ContainerHealthWait,
    ContainerInfo,
    ContainerList,
    ContainerLogs,
    ContainerPull,
    ContainerRestart,
    ContainerSpec,
    ContainerStart,
    ContainerStarted,
    ContainerStatsStream,
    ContainerStop,
    ContainerVolumeCreate,
    ContainerVolumeList,
    ContainerWait,
    LogLine,
    Mount,
    Resources,
    VolumeInfo,
)
from baaaht.schemas.errors import ErrorCode
from baaaht.schemas.policy import Decision, ExecDecision, Principal, Violation
from baaaht.schemas.sessions import SessionDeleted, SessionState
from baaaht.schemas.workspaces import ContainerWorkspaceList, ContainerWorkspaceRead, ContainerWorkspaceWrite
from baaaht.services.containers import session_volumes
from baaaht.services.containers.hardening import BUS_ENV
from baaaht.services.containers.ownership import LABEL_INSTALL, LABEL_MANAGED, LABEL_OWNER, LABEL_SESSION
from baaaht.services.containers.peers import BusAgentDirectory, BusPolicyGate, BusSessionDirectory
from baaaht.services.containers.runtime import EngineUnavailable
from baaaht.services.containers.service import ContainerService
from baaaht.services.containers.workspaces import Workspaces
from tests.container_fakes import (
    FakeAgents,
    FakePolicy,
    FakeRuntime,
    FakeSessions,
    engine_event,
    replace,
    session_info,
)
from tests.workspace_fakes import FakeWorkspaceMounts

INSTALL = "c" * 32
OURS = {LABEL_MANAGED: "true", LABEL_INSTALL: INSTALL}


@pytest.fixture
def run_dir(tmp_path):
    agent = tmp_path / "run" / "agent"
    agent.mkdir(parents=True)
    os.chown(agent, -1, AGENT_GID)  # as the broker does: the socket group, never 0
    return tmp_path / "run"


def make_service(
    run_dir, runtime=None, *, max_containers=10, max_ops=8, grace=0.0, agent_image="", assistant=None, **kw
):
    config = Config(
        bus=BusConfig(run_dir=str(run_dir)),
        policy=PolicyConfig(max_containers=max_containers),
        runtime=RuntimeConfig(max_concurrent_ops=max_ops),
        container=ContainerConfig(orphan_grace=grace, reconcile_interval=3600, agent_image=agent_image),
        assistant=assistant or AssistantConfig(),
    )
    service = ContainerService(
        config,
        FakeRuntime() if runtime is None else runtime,
        install_id=INSTALL,
        events=FakeBus(),
        policy=kw.pop("policy", FakePolicy()),
        sessions=kw.pop("sessions", FakeSessions(session_info("s1"))),
        identities=kw.pop("identities", IdentityStore(str(run_dir))),
        agents=kw.pop("agents", FakeAgents()),
        workspaces=kw.pop("workspaces", None) or fake_workspaces(run_dir),
        **kw,
    )
    service.check_engine()
    return service


def fake_workspaces(run_dir) -> Workspaces:
    return Workspaces(
        str(run_dir.parent / "data"), 64 * 1024 * 1024, FakeWorkspaceMounts(str(run_dir.parent / "aside"))
    )


def create(service, session="s1", **spec):
    spec.setdefault("image", "busybox:1")
    return service.create(ContainerCreate(spec=ContainerSpec(**spec), session_id=session), context())


AGENT_GID = 4242


def test_create_asks_the_policy_with_the_request_as_made_and_labels_the_container(run_dir):
    policy = FakePolicy()
    policy.enforce = lambda spec: replace(spec, resources=replace(spec.resources, memory=64 * 1024 * 1024))
    service = make_service(run_dir, policy=policy)
    result = create(service, session="s1")
    judged, principal, host_count, session_count, override = policy.seen[0]
    # Nothing filled in before the policy: its own defaults are the only ones, applied once, by it.
    assert judged == ContainerSpec(image="busybox:1")
    assert (principal.user, principal.session_id, principal.role) == ("alice", "s1", "agent")
    assert (host_count, session_count, override) == (0, 0, {})
    made = service.runtime.containers[result.id]["spec"]
    assert made.resources.memory == 64 * 1024 * 1024  # the policy's enforced spec is what gets created
    assert made.labels == {
        **OURS,
        "baaaht.owner": "session",
        LABEL_SESSION: "s1",
        "baaaht.role": "agent",
        "baaaht.agent_bus": "true",
    }
    assert made.env[BUS_ENV] == "ipc:///run/baaaht/agent/bus.sock"
    assert made.group_add == [str(AGENT_GID)]
    assert any(m.source == str(run_dir / "agent") and m.read_only for m in made.mounts)
    second = create(service, session="s1")
    assert second.name != result.name and policy.seen[1][2:4] == (1, 1)


def test_a_policy_denial_creates_nothing(run_dir):
    policy = FakePolicy()
    policy.error = BusError(ErrorCode.PERMISSION_DENIED, "policy denied", {"rules": ["image.denied"]})
    service = make_service(run_dir, policy=policy)
    assert code_of(lambda: create(service)) is ErrorCode.PERMISSION_DENIED
    assert service.runtime.containers == {}


def decision_for(request, allowed: bool = True, **fields) -> Decision:
    """The policy service's answer to `request`, enforcing its spec as it is."""
    return Decision(
        decision_id="d",
        allowed=allowed,
        outcome="allow" if allowed else "deny",
        mode="strict",
        policy_version="1",
        enforced=request.spec,
        **fields,
    )


def denial(request) -> Decision:
    return decision_for(request, allowed=False, violations=[Violation(rule="security.root", message="root")])


def test_an_unreachable_policy_service_refuses_the_create(run_dir):
    def no_policy(request):
        raise unavailable("no instance of service 'policy' is registered")

    bus = FakeBus(default=no_policy)
    service = make_service(run_dir, policy=BusPolicyGate(bus, 1.0))
    with pytest.raises(BusError) as caught:
        create(service)
    assert caught.value.code is ErrorCode.UNAVAILABLE
    assert "policy service could not be consulted" in caught.value.message
    assert service.runtime.containers == {}
    denied = make_service(run_dir, policy=BusPolicyGate(FakeBus(default=denial), 1.0))
    with pytest.raises(BusError) as caught:
        create(denied)
    assert caught.value.code is ErrorCode.PERMISSION_DENIED and caught.value.details["rules"] == [
        "security.root"
    ]


def test_the_quota_counts_live_containers_of_this_install(run_dir):
    runtime = FakeRuntime()
    runtime.add({LABEL_MANAGED: "true", LABEL_INSTALL: "other"})  # another install: not counted
    service = make_service(run_dir, runtime, max_containers=2)
    first = create(service)
    create(service)
    with pytest.raises(BusError) as caught:
        create(service)
    assert caught.value.code is ErrorCode.RESOURCE_EXHAUSTED and "2 of 2" in caught.value.message
    service.start(ContainerStart(id=first.id), context())  # already counted since its create
    service.stop(ContainerStop(id=first.id), context())  # exited: no longer counted
    third = create(service)
    # Bringing the exited one back, by start or by restart, would make three live containers.
    assert code_of(lambda: service.start(ContainerStart(id=first.id), context())) is (
        ErrorCode.RESOURCE_EXHAUSTED
    )
    assert code_of(lambda: service.restart(ContainerRestart(id=first.id), context())) is (
        ErrorCode.RESOURCE_EXHAUSTED
    )
    service.start(ContainerStart(id=third.id), context())


def test_concurrent_creates_never_exceed_the_quota(run_dir):
    service = make_service(run_dir, max_containers=5)
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        outcomes = list(pool.map(lambda _: _outcome(lambda: create(service)), range(12)))
    assert outcomes.count("ok") == 5 and outcomes.count(ErrorCode.RESOURCE_EXHAUSTED) == 7


def _outcome(call):
    try:
        call()
        return "ok"
    except BusError as exc:
        return exc.code


def test_containers_of_other_installs_are_invisible(run_dir):
    runtime = FakeRuntime()
    foreign = runtime.add({LABEL_MANAGED: "true", LABEL_INSTALL: "other"})
    unmanaged = runtime.add({})
    service = make_service(run_dir, runtime)
    for container in (foreign, unmanaged):
        assert code_of(lambda c=container: service.get(ContainerGet(id=c), context())) is ErrorCode.NOT_FOUND
        assert code_of(
            lambda c=container: service.destroy(ContainerDestroy(id=c, force=True), context())
        ) is (ErrorCode.NOT_FOUND)
    assert service.list(ContainerList(), context()).containers == []
    assert set(runtime.containers) == {foreign, unmanaged}


def test_engine_operations_run_concurrently_up_to_the_limit(run_dir):
    runtime = FakeRuntime()
    service = make_service(run_dir, runtime, max_ops=3)
    ids = [create(service).id for _ in range(8)]
    runtime.gate = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(service.start, ContainerStart(id=i), context()) for i in ids]
        wait_for(lambda: runtime.in_flight == 3, what="three starts in flight at once")
        runtime.gate.set()
        for future in futures:
            future.result(timeout=10)
    assert runtime.max_in_flight == 3


def test_waiting_for_an_engine_slot_ends_at_the_deadline(run_dir):
    runtime = FakeRuntime()
    service = make_service(run_dir, runtime, max_ops=1)
    first, second = create(service).id, create(service).id
    runtime.gate = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        blocked = pool.submit(service.start, ContainerStart(id=first), context())
        wait_for(lambda: runtime.in_flight == 1, what="the first start to hold the slot")
        with pytest.raises(BusError) as caught:
            service.start(ContainerStart(id=second), context(timeout=0.2))
        assert caught.value.code is ErrorCode.TIMEOUT and "max_concurrent_ops" in caught.value.message
        runtime.gate.set()
        blocked.result(timeout=10)


def test_wait_lasts_until_the_container_exits_or_the_caller_gives_up(run_dir):
    runtime = FakeRuntime()
    service = make_service(run_dir, runtime)
    with serving(service):
        container = create(service).id
        service.start(ContainerStart(id=container), context())
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            waiting = pool.submit(service.wait, ContainerWait(id=container), context(timeout=3600))
            wait_for(lambda: runtime.waits.get(container), what="the wait to reach the engine")
            runtime.exit(container, 3)
            assert waiting.result(timeout=10).exit_code == 3

            other = create(service).id
            service.start(ContainerStart(id=other), context())
            ctx = context(timeout=3600)
            cancelled = pool.submit(service.wait, ContainerWait(id=other), ctx)
            wait_for(lambda: runtime.waits.get(other), what="the second wait to reach the engine")
            ctx.cancelled.set()
            assert code_of(lambda: cancelled.result(timeout=10)) is ErrorCode.CANCELLED
            assert (
                code_of(lambda: service.wait(ContainerWait(id=other), context(timeout=0.2)))
                is ErrorCode.TIMEOUT
            )


def test_a_log_follower_ends_when_its_caller_cancels(run_dir):
    runtime = FakeRuntime()
    service = make_service(run_dir, runtime)
    with serving(service):
        container = create(service).id
        ctx = context(timeout=3600)
        chunks = service.logs(ContainerLogs(id=container, follow=True), ctx)
        assert [next(chunks).lines[0].text for _ in range(3)] == ["line 0", "line 1", "line 2"]
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            rest = pool.submit(list, chunks)
            ctx.cancelled.set()
            assert code_of(lambda: rest.result(timeout=10)) is ErrorCode.CANCELLED
        assert runtime.log_streams[0].closed.is_set()
        batch = list(service.logs(ContainerLogs(id=container), context()))
        assert len(batch) == 1 and len(batch[0].lines) == 3  # a plain read comes in batches


def test_stats_stream_and_pull_pass_through(run_dir):
    service = make_service(run_dir)
    with serving(service):
        container = create(service).id
        samples = list(service.stats_stream(ContainerStatsStream(id=container, interval=1.0), context()))
        assert len(samples) == 1  # the fake's samples come at once: one per interval is passed on
        assert [p.status for p in service.pull(ContainerPull(image="new:1"), context())] == ["Downloaded"]
        assert create(service, image="new:1").id


def test_exec_runs_in_a_container_of_this_installation(run_dir):
    service = make_service(run_dir)
    container = create(service).id
    request = ContainerExec(id=container, command=["id", "-u"], env={"A": "1"}, working_dir="/tmp")
    assert code_of(lambda: service.exec(request, context())) is ErrorCode.FAILED_PRECONDITION
    service.start(ContainerStart(id=container), context())
    assert service.exec(request, context()).stdout == "['id', '-u'] {'A': '1'} /tmp"
    empty = ContainerExec(id=container, command=[])
    assert code_of(lambda: service.exec(empty, context())) is ErrorCode.INVALID_ARGUMENT
    bad_env = ContainerExec(id=container, command=["true"], env={"A=B": "1"})
    assert code_of(lambda: service.exec(bad_env, context())) is ErrorCode.INVALID_ARGUMENT
    foreign = service.runtime.add({})  # not labelled as ours
    assert code_of(lambda: service.exec(ContainerExec(id=foreign, command=["true"]), context())) is (
        ErrorCode.NOT_FOUND
    )


def test_health_wait_returns_as_soon_as_the_outcome_is_known(run_dir):
    runtime = FakeRuntime()
    service = make_service(run_dir, runtime)
    container = create(service).id
    starting = ContainerHealthReport(status="starting", has_healthcheck=True, state="running")
    runtime.health_script = [
        starting,
        starting,
        ContainerHealthReport(status="healthy", has_healthcheck=True),
        starting,
    ]
    report = service.health_wait(ContainerHealthWait(id=container, retries=10, interval=0.01), context())
    assert report.status == "healthy" and runtime.health_script == [starting]
    runtime.health_script = [ContainerHealthReport(status="unhealthy", has_healthcheck=True)]
    assert (
        service.health_wait(ContainerHealthWait(id=container, interval=0.01), context()).status == "unhealthy"
    )
    last = service.health_wait(ContainerHealthWait(id=container, retries=2, interval=0.01), context())
    assert last.status == "starting"


def test_reconcile_removes_orphans_and_nothing_when_sessions_cannot_be_asked(run_dir):
    runtime = FakeRuntime()
    orphan = runtime.add({**OURS, LABEL_SESSION: "gone"}, created=0)
    closed = runtime.add({**OURS, LABEL_SESSION: "done"}, created=0)
    alive = runtime.add({**OURS, LABEL_SESSION: "live"}, created=0)
    foreign = runtime.add({LABEL_MANAGED: "true", LABEL_INSTALL: "other", LABEL_SESSION: "gone"}, created=0)
    sessions = FakeSessions(session_info("live"), session_info("done", SessionState.CLOSED))
    sessions.error = unavailable("no instance of service 'session' is registered")
    service = make_service(run_dir, runtime, sessions=sessions)
    report = service.reconcile_now()
    assert "session service could not be asked" in report.skipped and report.removed == []
    assert set(runtime.containers) == {orphan, closed, alive, foreign}
    sessions.error = None
    report = service.reconcile_now()
    assert sorted(r.id for r in report.removed) == sorted([orphan, closed])
    assert set(runtime.containers) == {alive, foreign}
    assert [op for op, target in runtime.calls if target == orphan] == ["stop", "remove"]


def test_the_session_directory_tells_missing_from_unreachable():
    def answer(request):
        raise BusError(
            ErrorCode.NOT_FOUND, f"no session {request.session_id}", {"session_id": request.session_id}
        )

    assert BusSessionDirectory(FakeBus(default=answer), 1.0).verdict("s9") == "missing"

    def no_method(request):
        raise BusError(ErrorCode.NOT_FOUND, "service 'session' has no method 'session.get'")

    with pytest.raises(BusError):
        BusSessionDirectory(FakeBus(default=no_method), 1.0).verdict("s9")


def test_without_a_runtime_the_service_is_unhealthy_and_answers_unavailable(run_dir):
    service = make_service(run_dir, None, runtime_problem="apple runtime is not supported on this host")
    service.runtime = None
    assert service.health_report() == (False, "apple runtime is not supported on this host")
    with pytest.raises(BusError) as caught:
        create(service)
    assert caught.value.code is ErrorCode.UNAVAILABLE and "apple runtime" in caught.value.message


def test_an_engine_that_goes_down_makes_the_service_unhealthy(run_dir):
    runtime = FakeRuntime()
    service = make_service(run_dir, runtime)
    assert service.health_report() == (True, "")
    runtime.down_reason = "the docker engine at unix:///nowhere is unreachable"
    assert not service.check_engine()
    assert service.health_report() == (False, runtime.down_reason)
    assert code_of(lambda: create(service)) is ErrorCode.UNAVAILABLE


def test_engine_events_are_republished(run_dir):
    runtime = FakeRuntime()
    service = make_service(run_dir, runtime)
    with serving(service):
        runtime.event_streams.wait_for_count(1, what="the event follower to subscribe")
        labels = {**OURS, LABEL_SESSION: "s1"}
        first = engine_event("start", "c1", labels)
        runtime.event_streams[0].put(first)
        runtime.event_streams[0].put(engine_event("start", "c2", {**labels, LABEL_INSTALL: "other"}))
        published = service.events.wait_for_events(what="an event on the bus")
        assert isinstance(published[0], ContainerStarted) and published[0].container_id == "c1"
        # A broken feed is reopened from the last event seen, and a replayed event is not published twice.
        runtime.event_streams[0].end()
        runtime.event_streams.wait_for_count(2, what="the follower to reconnect")
        runtime.event_streams[1].put(first)
        runtime.event_streams[1].put(engine_event("die", "c1", labels, exitCode="0"))
        service.events.wait_for_events(count=2, what="the die event")
        assert [type(e).__name__ for e in service.events.events()] == ["ContainerStarted", "ContainerDied"]


def test_an_agent_bus_of_group_0_is_refused_before_the_policy_is_asked(run_dir):
    os.chown(run_dir / "agent", -1, 0)
    policy = FakePolicy()
    service = make_service(run_dir, policy=policy)
    with pytest.raises(BusError) as caught:
        create(service)
    assert caught.value.code is ErrorCode.FAILED_PRECONDITION and "group 0" in caught.value.message
    assert policy.seen == [] and service.runtime.containers == {}


def test_the_agent_bus_needs_the_broker_directory(tmp_path):
    service = make_service(tmp_path / "no-run-dir")
    with pytest.raises(BusError) as caught:
        create(service)
    assert caught.value.code is ErrorCode.FAILED_PRECONDITION and "broker" in caught.value.message
    no_bus = service.create(
        ContainerCreate(spec=ContainerSpec(image="busybox:1"), session_id="s1", agent_bus=False), context()
    )
    assert BUS_ENV not in no_bus.spec.env


def test_resources_requested_explicitly_reach_the_policy(run_dir):
    policy = FakePolicy()
    service = make_service(run_dir, policy=policy)
    create(service, resources=Resources(memory=32 * 1024 * 1024, pids=16))
    judged = policy.seen[0][0]
    assert (judged.resources.memory, judged.resources.pids) == (32 * 1024 * 1024, 16)


# -- creates belong to a session ------------------------------------------------------------------


def refusal(call) -> BusError:
    with pytest.raises(BusError) as caught:
        call()
    return caught.value


def test_a_create_for_an_unknown_session_is_refused_before_anything_happens(run_dir):
    policy = FakePolicy()
    service = make_service(run_dir, policy=policy)
    error = refusal(lambda: create(service, session="nope"))
    assert error.code is ErrorCode.NOT_FOUND and "no session nope" in error.message
    assert error.details["session_id"] == "nope"
    assert policy.seen == [] and service.runtime.calls == []


@pytest.mark.parametrize("state", [SessionState.CLOSING, SessionState.CLOSED, SessionState.INITIALIZING])
def test_a_create_for_a_session_that_is_not_active_or_idle_is_refused(run_dir, state):
    policy = FakePolicy()
    service = make_service(run_dir, policy=policy, sessions=FakeSessions(session_info("s1", state)))
    error = refusal(lambda: create(service))
    assert error.code is ErrorCode.FAILED_PRECONDITION and f"session s1 is {state.value}" in error.message
    assert error.details == {"session_id": "s1", "state": state.value}
    assert policy.seen == [] and service.runtime.calls == []


def test_an_idle_session_gets_its_container(run_dir):
    sessions = FakeSessions(session_info("s1", SessionState.IDLE))
    service = make_service(run_dir, sessions=sessions)
    made = create(service)
    assert [c.id for c in sessions.sessions["s1"].containers] == [made.id]


def test_without_the_session_service_nothing_is_created(run_dir):
    def no_sessions(request):
        raise unavailable("no instance of service 'session' is registered")

    policy = FakePolicy()
    service = make_service(
        run_dir, policy=policy, sessions=BusSessionDirectory(FakeBus(default=no_sessions), 1.0)
    )
    error = refusal(lambda: create(service))
    assert error.code is ErrorCode.UNAVAILABLE
    assert error.message.startswith("container creation refused: the session service could not be consulted")
    assert "no instance of service 'session'" in error.message
    assert policy.seen == [] and service.runtime.calls == []


def test_the_policy_judges_on_behalf_of_the_session_under_its_settings(run_dir):
    tighter = {"quotas": {"max_memory": "64MB"}, "images": {"denied": ["evil/*"]}}
    sessions = FakeSessions(
        session_info("plain", owner="bob"),
        session_info("tight", owner="carol", policy_override=tighter, allowed_images=["busybox:*"]),
    )
    policy = FakePolicy()
    service = make_service(run_dir, policy=policy, sessions=sessions)
    create(service, session="plain")
    service.create(
        ContainerCreate(spec=ContainerSpec(image="busybox:1"), session_id="tight", role="worker"), context()
    )
    (_, plain_principal, *_, plain_override), (_, principal, *_, override) = policy.seen
    assert (plain_principal.user, plain_principal.session_id, plain_override) == ("bob", "plain", {})
    assert (principal.user, principal.session_id, principal.role) == ("carol", "tight", "worker")
    assert override == {
        "quotas": {"max_memory": "64MB"},
        "images": {"denied": ["evil/*"], "allowed": ["busybox:*"]},
    }
    assert sessions.sessions["tight"].settings.policy_override == tighter  # the session's own is untouched


def test_two_session_image_allow_lists_refuse_the_create(run_dir):
    override = {"images": {"allowed": ["busybox:1"]}}
    sessions = FakeSessions(
        session_info("same", policy_override=override, allowed_images=["busybox:1"]),
        session_info("both", policy_override=override, allowed_images=["busybox:*"]),
    )
    policy = FakePolicy()
    service = make_service(run_dir, policy=policy, sessions=sessions)
    create(service, session="same")
    assert policy.seen[0][4] == override  # the same list twice is one list
    error = refusal(lambda: create(service, session="both"))
    assert error.code is ErrorCode.FAILED_PRECONDITION and "policy engine takes one" in error.message
    assert error.details["field"] == "settings.allowed_images"
    assert len(policy.seen) == 1 and len(service.runtime.containers) == 1


def test_a_session_full_of_containers_gets_none_more_and_nothing_stays_behind(run_dir):
    sessions = FakeSessions(session_info("s1", max_containers=1))
    service = make_service(run_dir, sessions=sessions)
    first = create(service)
    assert [c.id for c in sessions.sessions["s1"].containers] == [first.id]
    error = refusal(lambda: create(service))
    assert error.code is ErrorCode.RESOURCE_EXHAUSTED and "max_containers is 1" in error.message
    assert error.message.endswith("the new container was removed") and error.details["limit"] == 1
    assert list(service.runtime.containers) == [first.id]
    assert [op for op, _ in service.runtime.calls] == ["create", "create", "remove"]


def test_a_session_that_begins_closing_during_the_create_does_not_keep_the_container(run_dir):
    sessions = FakeSessions(session_info("s1"))
    sessions.before_attach = lambda: setattr(sessions.sessions["s1"], "state", SessionState.CLOSING)
    service = make_service(run_dir, sessions=sessions)
    error = refusal(lambda: create(service))
    assert error.code is ErrorCode.FAILED_PRECONDITION and "it is closing" in error.message
    assert service.runtime.containers == {} and sessions.sessions["s1"].containers == []


def test_a_container_the_close_step_removed_already_counts_as_removed(run_dir):
    runtime = FakeRuntime()
    sessions = FakeSessions(session_info("s1"))

    def closed_meanwhile():
        sessions.sessions["s1"].state = SessionState.CLOSED
        runtime.containers.clear()  # the close step listed the new container and destroyed it

    sessions.before_attach = closed_meanwhile
    service = make_service(run_dir, runtime, sessions=sessions)
    error = refusal(lambda: create(service))
    assert error.code is ErrorCode.FAILED_PRECONDITION and "the new container was removed" in error.message
    assert runtime.containers == {}


def test_the_session_service_lost_after_the_create_leaves_no_container(run_dir):
    sessions = FakeSessions(session_info("s1"))

    def session_service_gone():
        sessions.error = unavailable("the session service could not be consulted about session s1")

    sessions.before_attach = session_service_gone
    service = make_service(run_dir, sessions=sessions)
    error = refusal(lambda: create(service))
    assert error.code is ErrorCode.UNAVAILABLE and "the new container was removed" in error.message
    assert service.runtime.containers == {}


def test_a_refused_container_the_engine_cannot_remove_is_named(run_dir):
    runtime = FakeRuntime()
    sessions = FakeSessions(session_info("s1", max_containers=1))
    service = make_service(run_dir, runtime, sessions=sessions)
    create(service)

    def engine_down():
        runtime.down_reason = "the docker engine stopped answering"

    sessions.before_attach = engine_down
    error = refusal(lambda: create(service))
    left = error.details["container_id"]
    assert error.code is ErrorCode.RESOURCE_EXHAUSTED and left in runtime.containers
    assert f"the new container {left} could not be removed" in error.message
    assert "the docker engine stopped answering" in error.message


def test_the_session_directory_passes_on_the_session_services_own_refusals():
    def full(request):
        raise BusError(
            ErrorCode.RESOURCE_EXHAUSTED,
            f"session {request.session_id} already has 1 containers, its limit max_containers is 1",
            {"session_id": request.session_id, "limit": 1},
        )

    directory = BusSessionDirectory(FakeBus(default=full), 1.0)
    with pytest.raises(BusError) as caught:
        directory.attach("s1", "c" * 64)
    assert caught.value.code is ErrorCode.RESOURCE_EXHAUSTED and caught.value.details["limit"] == 1

    def slow(request):
        raise BusError(ErrorCode.TIMEOUT, "session.attach_container did not answer in time")

    bus = FakeBus(default=slow)
    with pytest.raises(BusError) as caught:
        BusSessionDirectory(bus, 1.0).attach("s1", "c" * 64)
    assert caught.value.code is ErrorCode.UNAVAILABLE and "did not answer in time" in caught.value.message
    assert (bus.requests()[0].session_id, bus.requests()[0].container_id) == ("s1", "c" * 64)


def test_the_policy_gate_sends_the_session_override():
    bus = FakeBus(default=decision_for)
    spec = ContainerSpec(image="busybox:1")
    override = {"images": {"allowed": ["busybox:*"]}}
    principal = Principal(user="alice", session_id="s1", role="agent")
    assert BusPolicyGate(bus, 1.0).evaluate(spec, principal, 2, 1, override) == (spec, [])
    sent = bus.requests()[0]
    assert (sent.override, sent.principal, sent.host_containers, sent.session_containers) == (
        override,
        principal,
        2,
        1,
    )


def test_a_permissive_allowance_and_policy_warnings_reach_the_create_result(run_dir):
    def permissive(request) -> Decision:
        return msgspec.structs.replace(
            decision_for(request),
            outcome="permissive",
            mode="permissive",
            violations=[Violation(rule="security.root", message="runs as root")],
            warnings=[Violation(rule="mounts.symlink", message="an allowlist entry is a symlink")],
        )

    gate = BusPolicyGate(FakeBus(default=permissive), 1.0)
    service = make_service(run_dir, policy=gate)
    assert create(service).warnings == [
        "allowed in permissive mode despite security.root: runs as root",
        "policy mounts.symlink: an allowlist entry is a symlink",
    ]


# -- ownership, engine errors, session volumes ---------------------------------------------------------


def test_pool_and_system_containers_are_ours_to_list_and_operate_but_never_orphans(run_dir):
    runtime = FakeRuntime()
    pooled = runtime.add({**OURS, LABEL_OWNER: "pool"}, created=0)
    system = runtime.add({**OURS, LABEL_OWNER: "system"}, created=0)
    unknown = runtime.add({**OURS, LABEL_OWNER: "future-kind"}, created=0)
    service = make_service(run_dir, runtime)
    report = service.reconcile_now()
    assert report.removed == [] and report.kept == 2
    listed = {c.id for c in service.list(ContainerList(), context()).containers}
    assert listed == {pooled, system}
    assert service.get(ContainerGet(id=pooled), context()).id == pooled
    assert code_of(lambda: service.get(ContainerGet(id=unknown), context())) is ErrorCode.NOT_FOUND


def test_engine_errors_reach_callers_as_codes_also_in_the_middle_of_a_stream(run_dir):
    runtime = FakeRuntime()
    service = make_service(run_dir, runtime)
    container = create(service).id

    def broken_logs(ref, options):
        yield LogLine(stream="stdout", text="first")
        raise EngineUnavailable("logs: the engine connection broke")

    runtime.logs = broken_logs
    stream = service.logs(ContainerLogs(id=container), context())
    with pytest.raises(BusError) as caught:
        list(stream)
    assert caught.value.code is ErrorCode.UNAVAILABLE and "connection broke" in caught.value.message
    runtime.containers[container]["state"] = "running"
    with pytest.raises(BusError) as caught:
        service.destroy(ContainerDestroy(id=container), context())
    assert caught.value.code is ErrorCode.FAILED_PRECONDITION and caught.value.details["target"] == container


def test_a_session_mounts_its_own_volumes_unjudged_and_never_another_sessions(run_dir):
    policy = FakePolicy()
    sessions = FakeSessions(session_info("s1"), session_info("s2"))
    service = make_service(run_dir, policy=policy, sessions=sessions)
    mine = service.volume_create(ContainerVolumeCreate(session_id="s1"), context())
    assert mine.session_id == "s1" and mine.labels[LABEL_OWNER] == "session"
    assert service.volume_create(ContainerVolumeCreate(session_id="s1"), context()) == mine
    workspace = Mount(type="volume", source=mine.name, target="/work")
    result = create(service, "s1", mounts=[workspace])
    judged = policy.seen[-1][0]
    assert workspace not in judged.mounts  # the orchestrator made it for this session: not the policy's
    assert (
        workspace in result.spec.mounts and workspace in service.runtime.containers[result.id]["spec"].mounts
    )
    shared = Mount(type="volume", source="shared", target="/shared")
    create(service, "s1", mounts=[shared])
    assert shared in policy.seen[-1][0].mounts  # any other volume is judged
    assert code_of(lambda: create(service, "s2", mounts=[workspace])) is ErrorCode.PERMISSION_DENIED
    listed = service.volume_list(ContainerVolumeList(session_id="s1"), context()).volumes
    assert (
        listed == [mine]
        and service.volume_list(ContainerVolumeList(session_id="s2"), context()).volumes == []
    )


def test_a_volume_is_made_only_for_an_open_session_and_never_taken_over(run_dir):
    runtime = FakeRuntime()
    sessions = FakeSessions(session_info("s1"), session_info("done", SessionState.CLOSED))
    service = make_service(run_dir, runtime, sessions=sessions)
    assert code_of(lambda: service.volume_create(ContainerVolumeCreate(session_id="done"), context())) is (
        ErrorCode.FAILED_PRECONDITION
    )
    assert code_of(lambda: service.volume_create(ContainerVolumeCreate(session_id="nope"), context())) is (
        ErrorCode.NOT_FOUND
    )
    assert code_of(
        lambda: service.volume_create(ContainerVolumeCreate(session_id="s1", name="a-b"), context())
    ) is (ErrorCode.INVALID_ARGUMENT)
    name = session_volumes.volume_name(INSTALL, "s1", "workspace")
    runtime.volumes[name] = VolumeInfo(name=name, labels={"made": "by hand"})
    with pytest.raises(BusError) as caught:
        service.volume_create(ContainerVolumeCreate(session_id="s1"), context())
    assert caught.value.code is ErrorCode.ALREADY_EXISTS and name in caught.value.message
    assert runtime.volumes == {name: VolumeInfo(name=name, labels={"made": "by hand"})}


def test_a_volume_made_while_its_session_is_deleted_does_not_stay(run_dir):
    runtime = FakeRuntime()
    sessions = FakeSessions(session_info("s1"))
    service = make_service(run_dir, runtime, sessions=sessions)
    make = runtime.create_volume

    def deleted_meanwhile(name, labels):
        del sessions.sessions["s1"]  # and its session.deleted found no volume yet
        service.on_session_deleted(SessionDeleted(session_id="s1", owner="alice"))
        return make(name, labels)

    runtime.create_volume = deleted_meanwhile
    assert code_of(lambda: service.volume_create(ContainerVolumeCreate(session_id="s1"), context())) is (
        ErrorCode.NOT_FOUND
    )
    assert runtime.volumes == {}


def test_a_session_deleted_event_for_a_session_that_still_exists_removes_nothing(run_dir):
    # Any host peer may publish session.deleted: a forged or mistaken one must not cost a session its files.
    runtime = FakeRuntime()
    sessions = FakeSessions(session_info("s1"), session_info("done", SessionState.CLOSED))
    service = make_service(run_dir, runtime, sessions=sessions)
    service.volume_create(ContainerVolumeCreate(session_id="s1"), context())
    sessions.sessions["done"].state = SessionState.ACTIVE
    service.volume_create(ContainerVolumeCreate(session_id="done"), context())
    sessions.sessions["done"].state = SessionState.CLOSED
    for session in ("s1", "done"):
        service.on_session_deleted(SessionDeleted(session_id=session, owner="alice"))
    sessions.error = unavailable("the session service is away")
    service.on_session_deleted(SessionDeleted(session_id="s1", owner="alice"))
    assert sorted(v.session_id for v in runtime.volumes.values()) == ["done", "s1"]


def test_a_deleted_sessions_volumes_are_removed_and_reconcile_removes_what_was_missed(run_dir):
    runtime = FakeRuntime()
    sessions = FakeSessions(session_info("s1"), session_info("s2"), session_info("s3"))
    service = make_service(run_dir, runtime, sessions=sessions)
    for session in ("s1", "s2", "s3"):
        service.volume_create(ContainerVolumeCreate(session_id=session), context())
    foreign = VolumeInfo(name="foreign", labels={LABEL_MANAGED: "true", LABEL_INSTALL: "o" * 32})
    runtime.volumes["foreign"] = foreign
    del sessions.sessions["s1"]
    service.on_session_deleted(SessionDeleted(session_id="s1", owner="alice"))
    assert sorted(v.session_id for v in runtime.volumes.values()) == ["", "s2", "s3"]
    # s2 was deleted while nobody listened; s3 is closed, and its files outlive the close.
    del sessions.sessions["s2"]
    sessions.sessions["s3"].state = SessionState.CLOSED
    report = service.reconcile_now()
    assert report.removed_volumes == [session_volumes.volume_name(INSTALL, "s2", "workspace")]
    assert sorted(v.session_id for v in runtime.volumes.values()) == ["", "s3"]


# -- who may ask: the host only -------------------------------------------------------------------


def every_container_request(container_id: str) -> list:
    """One request of each container.* method, about a real container of session s1."""
    return [
        c.ContainerCreate(spec=ContainerSpec(image="busybox:1"), session_id="s1"),
        c.ContainerDestroy(id=container_id, force=True),
        c.ContainerExec(id=container_id, command=["true"]),
        c.ContainerGet(id=container_id),
        c.ContainerHealth(id=container_id),
        c.ContainerHealthWait(id=container_id),
        c.ContainerImageExists(image="busybox:1"),
        c.ContainerKill(id=container_id, signal="SIGKILL"),
        c.ContainerList(),
        c.ContainerLogs(id=container_id),
        c.ContainerPause(id=container_id),
        c.ContainerPoolResize(size=0),
        c.ContainerPoolStatus(),
        c.ContainerPull(image="busybox:1"),
        c.ContainerReconcile(),
        c.ContainerRestart(id=container_id),
        c.ContainerStart(id=container_id),
        c.ContainerStats(id=container_id),
        c.ContainerStatsStream(id=container_id),
        c.ContainerStop(id=container_id),
        c.ContainerUnpause(id=container_id),
        c.ContainerVolumeCreate(session_id="s1", name="work"),
        c.ContainerVolumeList(),
        c.ContainerWait(id=container_id),
        ContainerWorkspaceList(session_id="s1"),
        ContainerWorkspaceRead(session_id="s1", path="f"),
        ContainerWorkspaceWrite(session_id="s1", path="f", data=b"x"),
    ]


@pytest.mark.parametrize("role", ["agent", "assistant", "worker", "unidentified"])
def test_no_agent_caller_gets_anything_done_by_the_container_manager(run_dir, role):
    runtime = FakeRuntime()
    own = runtime.add({**OURS, LABEL_OWNER: "session", LABEL_SESSION: "s1"})
    harness = ServiceHarness(
        ContainerService,
        Config(bus=BusConfig(run_dir=str(run_dir))),
        runtime,
        install_id=INSTALL,
        policy=FakePolicy(),
        sessions=FakeSessions(session_info("s1")),
        identities=IdentityStore(str(run_dir)),
        agents=FakeAgents(),
        workspaces=fake_workspaces(run_dir),
    )
    requests = every_container_request(own)
    assert {type(r) for r in requests} == {s.request_type for s in ContainerService.rpcs().values()}
    agent = context(caller=agent_caller("s1", role))  # even in its own session
    before = dict(runtime.containers)
    for request in requests:
        error = error_of(lambda request=request: harness.call(request, agent))
        assert error.code is ErrorCode.PERMISSION_DENIED, request
        assert f"{role} callers may not call container." in error.message
    assert runtime.calls == [] and runtime.containers == before and runtime.volumes == {}
    assert harness.bus.calls == []


def test_exec_is_judged_by_the_policy_on_behalf_of_the_caller_before_it_runs(run_dir):
    policy = FakePolicy()
    service = make_service(run_dir, policy=policy)
    container = create(service).id
    service.start(ContainerStart(id=container), context())
    operator = operator_caller(uid=1000)
    service.exec(ContainerExec(id=container, command=["true"]), context(caller=operator))
    assert policy.execs == [(container, ["true"], Principal(user="operator/uid=1000", role="operator"))]
    policy.error = BusError(
        ErrorCode.PERMISSION_DENIED, "policy denied the command", {"rules": ["exec.session"]}
    )
    ran = [op for op, _ in service.runtime.calls]
    error = error_of(lambda: service.exec(ContainerExec(id=container, command=["rm", "-rf", "/"]), context()))
    assert error.code is ErrorCode.PERMISSION_DENIED
    assert [op for op, _ in service.runtime.calls] == ran  # nothing ran
    policy.error = unavailable("no instance of service 'policy' is registered")
    assert code_of(lambda: service.exec(ContainerExec(id=container, command=["true"]), context())) is (
        ErrorCode.UNAVAILABLE
    )


def test_the_policy_gate_asks_about_the_containers_session_and_refuses_a_denial():
    denied = ExecDecision(
        decision_id="d1",
        allowed=False,
        outcome="deny",
        mode="strict",
        policy_version="v1",
        violations=[Violation(rule="exec.session", message="not its session")],
    )
    bus = FakeBus({"policy.evaluate_exec": denied})
    container = ContainerInfo(id="a" * 64, name="n", image="busybox:1", state="running", session_id="s2")
    request = ContainerExec(id="a" * 64, command=["ls"], env={"TOKEN": "secret"})
    principal = Principal(user="agent/x", session_id="s1", role="agent")
    error = error_of(lambda: BusPolicyGate(bus, 1.0).evaluate_exec(container, request, principal))
    assert error.code is ErrorCode.PERMISSION_DENIED and "exec.session" in error.message
    (asked,) = bus.requests()
    assert (asked.container_id, asked.session_id, asked.env_names, asked.principal) == (
        "a" * 64,
        "s2",
        ["TOKEN"],
        principal,
    )


def test_the_broker_is_asked_to_judge_the_containers_connections_anew():
    bus = FakeBus({BusAgentsUpdate: BusAgentsUpdateResult(connections=0)})
    BusAgentDirectory(bus, 1.0).updated("a" * 64)
    assert [r.container_id for r in bus.requests(BusAgentsUpdate)] == ["a" * 64]
    unanswered = FakeBus()
    assert code_of(lambda: BusAgentDirectory(unanswered, 1.0).updated("a" * 64)) is ErrorCode.UNAVAILABLE


def test_a_deleted_sessions_workspace_is_removed_and_reconcile_removes_what_was_missed(run_dir):
    sessions = FakeSessions(session_info("s1"), session_info("s2"), session_info("s3"), session_info("s4"))
    service = make_service(run_dir, sessions=sessions)
    workspaces = service.workspaces
    for session in ("s1", "s2", "s3", "s4"):
        workspaces.ensure(session)
    del sessions.sessions["s1"]
    service.on_session_deleted(SessionDeleted(session_id="s1", owner="alice"))
    assert workspaces.sessions() == ["s2", "s3", "s4"] and workspaces.path("s1") is None
    # A forged or mistaken session.deleted costs an existing session nothing.
    service.on_session_deleted(SessionDeleted(session_id="s4", owner="alice"))
    sessions.error = unavailable("the session service is away")
    service.on_session_deleted(SessionDeleted(session_id="s4", owner="alice"))
    assert workspaces.sessions() == ["s2", "s3", "s4"]
    sessions.error = None
    # s2 was deleted while nobody listened; s3 is closed, and its files outlive the close.
    del sessions.sessions["s2"]
    sessions.sessions["s3"].state = SessionState.CLOSED
    report = service.reconcile_now()
    assert report.removed_workspaces == ["s2"] and report.failed_workspaces == []
    assert workspaces.sessions() == ["s3", "s4"]


def test_the_container_manager_mounts_existing_workspaces_when_it_starts(run_dir):
    first = make_service(run_dir)
    mounts = first.workspaces.mounts
    first.workspaces.ensure("s1")
    mounts.forget_mounts()  # the host restarted
    again = make_service(run_dir, workspaces=Workspaces(str(run_dir.parent / "data"), 1 << 26, mounts))
    assert again.workspaces.path("s1") is None
    again.on_start()
    assert again.workspaces.path("s1") == first.workspaces.target_of("s1")
