"""The session agents' supervisor (services/containers/session_agents.py) on a fake host and clock: one
agent per session and role, started off the caller's thread, restarted with backoff, removed when its
session stops needing it, found again after a restart; the warm pool asked first."""

from __future__ import annotations

import pytest

from baaaht.bus.errors import BusError
from baaaht.schemas.containers import ContainerSpec
from baaaht.schemas.errors import ErrorCode
from baaaht.services.containers.session_agents import AgentSpec, SessionAgents, worker_spec


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeHost:
    def __init__(self):
        self.started: list[tuple[str, str, AgentSpec]] = []
        self.removed: list[str] = []
        self.running: list[tuple[str, str, str]] = []
        self.failures = 0  # the next starts that fail

    def start(self, session_id, role, agent):
        if self.failures:
            self.failures -= 1
            raise BusError(ErrorCode.RESOURCE_EXHAUSTED, "container quota reached")
        self.started.append((session_id, role, agent))
        return f"c{len(self.started)}"

    def live(self):
        return list(self.running)

    def remove(self, container_id):
        self.removed.append(container_id)
        return ""


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def host():
    return FakeHost()


def agents_for(host, clock, claim=None) -> SessionAgents:
    specs = {"worker": lambda session: AgentSpec(spec=ContainerSpec(image=f"agent-for-{session}"))}
    return SessionAgents(host, specs, **({"claim": claim} if claim else {}), clock=clock)


def test_ensure_only_records_the_need_and_tend_starts_one_agent_per_session_and_role(host, clock):
    agents = agents_for(host, clock)
    agents.ensure("s1", "worker")
    agents.ensure("s1", "worker")
    assert host.started == [] and agents.wake.is_set()  # nothing started on the caller's thread
    agents.ensure("s2", "worker")
    agents.tend()
    agents.tend()
    assert [(s, r, a.spec.image) for s, r, a in host.started] == [
        ("s1", "worker", "agent-for-s1"),
        ("s2", "worker", "agent-for-s2"),
    ]
    assert agents.container_of("s1", "worker") == "c1" and agents.container_of("s2", "worker") == "c2"
    with pytest.raises(ValueError, match="no session agent role 'painter'"):
        agents.ensure("s1", "painter")


def test_a_dead_agent_is_replaced_after_a_doubling_backoff_reset_by_a_long_life(host, clock):
    agents = agents_for(host, clock)
    agents.ensure("s", "worker")
    agents.tend()
    waits = []
    for _ in range(8):
        agents.died(agents.container_of("s", "worker"))
        waits.append(agents.next_due() - clock.now)
        agents.tend()  # not due yet: only the dead container is removed
        clock.now = agents.next_due()
        agents.tend()
    assert waits == [1, 2, 4, 8, 16, 32, 60, 60]
    assert host.removed == [f"c{n}" for n in range(1, 9)] and len(host.started) == 9
    clock.now += 60  # lived a minute: the next restart is quick again
    agents.died(agents.container_of("s", "worker"))
    assert agents.next_due() - clock.now == 1
    agents.died("not-an-agent")  # another container's death changes nothing
    assert agents.next_due() - clock.now == 1


def test_a_failed_start_is_tried_again_after_the_backoff(host, clock):
    agents = agents_for(host, clock)
    host.failures = 2
    agents.ensure("s", "worker")
    agents.tend()
    assert host.started == [] and agents.next_due() == clock.now + 1
    clock.now += 1
    agents.tend()
    assert agents.next_due() == clock.now + 2
    clock.now += 2
    agents.tend()
    assert agents.container_of("s", "worker") == "c1"


def test_a_session_that_stops_needing_its_agents_has_them_removed_and_not_restarted(host, clock):
    agents = agents_for(host, clock)
    agents.ensure("s", "worker")
    agents.ensure("t", "worker")
    agents.tend()
    agents.stop_session("s")
    agents.tend()
    assert host.removed == ["c1"] and agents.container_of("s", "worker") == ""
    agents.died("c1")  # its removal's die: no restart
    clock.now += 100
    agents.tend()
    assert len(host.started) == 2 and agents.container_of("t", "worker") == "c2"


def test_after_a_restart_the_engines_session_agents_are_taken_up_and_a_second_one_retired(host, clock):
    host.running = [("old1", "s", "worker"), ("old2", "s", "worker"), ("old3", "t", "worker")]
    agents = agents_for(host, clock)
    agents.adopt()
    agents.ensure("s", "worker")
    agents.tend()
    assert host.started == [] and host.removed == ["old2"]
    assert agents.container_of("s", "worker") == "old1" and agents.container_of("t", "worker") == "old3"


def test_the_warm_pool_is_asked_first(host, clock):
    asked = []

    def claim(session_id, role):
        asked.append((session_id, role))
        return "pooled" if session_id == "warm" else None

    agents = agents_for(host, clock, claim)
    agents.ensure("warm", "worker")
    agents.ensure("cold", "worker")
    agents.tend()
    assert asked == [("warm", "worker"), ("cold", "worker")]
    assert agents.container_of("warm", "worker") == "pooled"
    assert [s for s, _r, _a in host.started] == ["cold"]


def test_a_worker_runs_the_worker_agent_on_its_sessions_workspace():
    agent = worker_spec("baaaht/agent:x", "/data/workspaces/s1")
    assert agent.spec.image == "baaaht/agent:x" and agent.spec.command == ["baaaht-agent", "worker"]
    ((mount),) = agent.own_mounts
    assert (mount.type, mount.source, mount.target, mount.read_only) == (
        "bind",
        "/data/workspaces/s1",
        "/workspace",
        False,
    )
