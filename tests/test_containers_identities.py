"""The identities the container manager issues its agent containers (common/identity.py): written
before a container can run, revoked when it stops, dies, is removed or its session ends, settled by
reconcile after a crash; the broker is told of every change."""

from __future__ import annotations

import errno

import pytest

from baaaht.bus.errors import unavailable
from baaaht.bus.testing import code_of, context, serving
from baaaht.common.identity import AgentIdentity, IdentityStore
from baaaht.schemas.containers import (
    ContainerCreate,
    ContainerDestroy,
    ContainerSpec,
    ContainerStart,
    ContainerStop,
)
from baaaht.schemas.errors import ErrorCode
from baaaht.schemas.sessions import SessionClosed, SessionDeleted, SessionState, SessionUpdated
from baaaht.services.containers.identities import Identities, agent_role
from baaaht.services.containers.ownership import (
    LABEL_AGENT_BUS,
    LABEL_OWNER,
    LABEL_ROLE,
    LABEL_SESSION,
)
from tests.container_fakes import FakeAgents, FakeRuntime, FakeSessions, engine_event, session_info
from tests.test_containers_service import INSTALL, OURS, make_service
from tests.test_containers_service import run_dir as run_dir  # the fixture


def agent_labels(session: str = "s1", role: str = "agent") -> dict[str, str]:
    return {**OURS, LABEL_OWNER: "session", LABEL_SESSION: session, LABEL_ROLE: role, LABEL_AGENT_BUS: "true"}


class World:
    def __init__(self, directory, *sessions, runtime=None):
        self.store = IdentityStore(str(directory))
        self.agents = FakeAgents()
        self.sessions = FakeSessions(*(sessions or (session_info("s1"),)))
        self.runtime = runtime or FakeRuntime()
        self.service = make_service(
            directory, self.runtime, sessions=self.sessions, identities=self.store, agents=self.agents
        )

    def create(self, session="s1", role="agent", agent_bus=True) -> str:
        request = ContainerCreate(
            spec=ContainerSpec(image="busybox:1"), session_id=session, role=role, agent_bus=agent_bus
        )
        return self.service.create(request, context()).id

    def identity(self, container_id: str) -> AgentIdentity | None:
        return self.store.get(container_id)


@pytest.fixture
def world(run_dir):
    return World(run_dir)


def test_an_agent_container_has_its_identity_before_it_can_start(world):
    container_id = world.create(role="worker")
    assert world.runtime.containers[container_id]["state"] == "created"  # not started: created only
    identity = world.identity(container_id)
    assert (identity.container_id, identity.session_id, identity.role, identity.install_id) == (
        container_id,
        "s1",
        "worker",
        INSTALL,
    )
    assert list(world.agents.told) == [container_id]


def test_a_container_without_the_agent_bus_has_no_identity(world):
    container_id = world.create(agent_bus=False, role="tool")
    assert world.identity(container_id) is None and list(world.agents.told) == []


@pytest.mark.parametrize("role", ["tool", "service", "operator", "unidentified"])
def test_a_container_with_the_agent_bus_gets_an_agent_role_or_is_not_made(world, role):
    assert code_of(lambda: world.create(role=role)) is ErrorCode.INVALID_ARGUMENT
    assert world.runtime.containers == {} and list(world.store.all()) == []


def test_a_container_its_session_refuses_is_removed_with_its_identity(run_dir):
    world = World(run_dir, session_info("s1", max_containers=1))
    kept = world.create()
    assert code_of(lambda: world.create()) is ErrorCode.RESOURCE_EXHAUSTED
    assert [i.container_id for i in world.store.all()] == [kept]
    refused = [c for c in world.agents.told if c != kept]
    assert len(refused) == 2  # issued, then revoked: the broker was told both times


def test_an_identity_that_cannot_be_written_leaves_no_container(world, monkeypatch):
    def full(identity):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(world.store, "put", full)
    assert code_of(lambda: world.create()) is ErrorCode.UNAVAILABLE
    assert world.runtime.containers == {}


def test_stop_and_destroy_revoke_at_once(world):
    stopped, destroyed = world.create(), world.create()
    world.service.stop(ContainerStop(id=stopped), context())
    world.service.destroy(ContainerDestroy(id=destroyed, force=True), context())
    assert world.identity(stopped) is None and world.identity(destroyed) is None
    assert list(world.agents.told).count(stopped) == 2 and list(world.agents.told).count(destroyed) == 2


def test_a_start_renews_the_identity_only_while_the_session_is_open(world):
    container_id = world.create()
    world.service.stop(ContainerStop(id=container_id), context())
    world.service.start(ContainerStart(id=container_id), context())
    assert world.identity(container_id).session_id == "s1"
    world.service.stop(ContainerStop(id=container_id), context())
    world.sessions.sessions["s1"].state = SessionState.CLOSING
    world.service.start(ContainerStart(id=container_id), context())
    assert world.identity(container_id) is None


def test_the_engine_saying_a_container_ended_revokes_and_a_restart_renews(world):
    container_id = world.create()
    labels = world.runtime.containers[container_id]["labels"]
    with serving(world.service):
        world.runtime.event_streams.wait_for_count(1, what="the event follower to subscribe")
        feed = world.runtime.event_streams[0]
        for action in ("die", "stop", "destroy"):
            world.service.identities.issue(container_id, "s1", "agent")
            told = len(world.agents.told)
            feed.put(engine_event(action, container_id, labels))
            world.agents.told.wait_for_count(told + 1, what=f"the broker told of the {action}")
            assert world.identity(container_id) is None, action
        # The restart policy starts it again: its session is open, so it is an agent again.
        feed.put(engine_event("start", container_id, labels))
        world.agents.told.wait_for_count(len(world.agents.told) + 1, what="the broker told of the start")
        assert world.identity(container_id).role == "agent"


def test_a_closing_session_revokes_its_containers_identities_only(run_dir):
    world = World(run_dir, session_info("s1"), session_info("s2"))
    first, second, other = world.create("s1"), world.create("s1"), world.create("s2")
    closing = session_info("s1", SessionState.CLOSING)
    world.service.on_session_updated(SessionUpdated(session=closing, change="state"))
    assert world.identity(first) is None and world.identity(second) is None
    assert world.identity(other) is not None
    world.service.on_session_closed(SessionClosed(session_id="s2", owner="alice", reason="done"))
    assert list(world.store.all()) == []


def test_a_deleted_session_leaves_no_identity(world):
    container_id = world.create()
    world.service.on_session_deleted(SessionDeleted(session_id="s1", owner="alice"))
    assert world.identity(container_id) is None


def test_reconcile_after_a_crash_reissues_what_it_keeps_and_revokes_what_is_gone(run_dir):
    runtime = FakeRuntime()
    kept = runtime.add(agent_labels("s1", "assistant"), created=0)
    exited = runtime.add(agent_labels("s1"), state="exited", created=0)
    of_closed = runtime.add(agent_labels("done"), created=0)
    young = runtime.add(agent_labels("new"), created=None)  # younger than the grace: its session unknown
    plain = runtime.add({**OURS, LABEL_OWNER: "session", LABEL_SESSION: "s1"}, created=0)  # no agent bus
    world = World(run_dir, session_info("s1"), session_info("done", SessionState.CLOSED), runtime=runtime)
    world.service.orphan_grace = 60.0
    gone = "f" * 64
    for container_id, session in ((gone, "s1"), (exited, "s1"), (of_closed, "done"), (young, "new")):
        world.store.put(
            AgentIdentity(
                container_id=container_id, session_id=session, role="agent", install_id=INSTALL, issued_at=1.0
            )
        )
    foreign = AgentIdentity(
        container_id="e" * 64, session_id="x", role="agent", install_id="other", issued_at=1.0
    )
    world.store.put(foreign)
    report = world.service.reconcile_now()
    assert [r.id for r in report.removed] == [of_closed]
    assert world.identity(kept).role == "assistant"  # re-issued from its labels
    for revoked in (gone, exited, of_closed):
        assert world.identity(revoked) is None
    assert world.identity(young) is not None  # left as it is until its session can be judged
    assert world.identity(plain) is None
    assert world.identity(foreign.container_id) == foreign  # another installation's: never touched
    assert set(world.agents.told) == {kept, gone, exited, of_closed}


def test_a_skipped_reconcile_still_revokes_the_identities_of_containers_that_are_gone(world):
    container_id = world.create()
    world.runtime.exit(container_id, 0)
    world.sessions.error = unavailable("no instance of service 'session' is registered")
    assert world.service.reconcile_now().skipped
    assert world.identity(container_id) is None


def test_a_broker_that_cannot_be_told_is_told_later(world):
    world.agents.error = unavailable("the broker is restarting")
    container_id = world.create()
    world.service.destroy(ContainerDestroy(id=container_id, force=True), context())
    assert world.identity(container_id) is None  # the file is what new connections read
    assert list(world.agents.told) == []
    world.agents.error = None
    world.service.maintain()
    assert list(world.agents.told) == [container_id]
    world.service.maintain()
    assert list(world.agents.told) == [container_id]


def test_agent_role_comes_from_labels_only_for_session_agent_containers():
    assert agent_role(agent_labels("s1", "worker"), INSTALL) == "worker"
    assert agent_role({**agent_labels(), LABEL_ROLE: "operator"}, INSTALL) == ""
    assert agent_role({**agent_labels(), LABEL_AGENT_BUS: "false"}, INSTALL) == ""
    assert agent_role({**agent_labels(), LABEL_OWNER: "pool"}, INSTALL) == ""
    assert agent_role(agent_labels(), "another-install") == ""


def test_identities_settle_keeps_what_it_cannot_judge(tmp_path):
    store, agents = IdentityStore(str(tmp_path)), FakeAgents()
    identities = Identities(store, INSTALL, agents, clock=lambda: 5.0)
    identities.issue("a" * 64, "s1", "agent")
    identities.settle([("a" * 64, agent_labels("s1"))], {})
    assert store.get("a" * 64).issued_at == 5.0
    identities.settle([("a" * 64, agent_labels("s1"))], {"s1": "missing"})
    assert store.get("a" * 64) is None
