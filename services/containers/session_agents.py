"""A session's agents: the container manager keeps one container of each agent role a session needs (its
tool worker; its assistant) running while the session is open.

`ensure(session_id, role)` says a session needs its agent of that role; it only records the need, so an
RPC or event thread never waits for a container start. The container manager's background work calls
`tend()`, which does the waiting: it asks the warm pool first (`claim`), else starts a container from
the role's spec (`AgentHost.start`); a start that fails, or an agent that dies, is started again after a
backoff (1 s, doubling up to 60 s; back to 1 s once an agent has lived 60 s). `stop_session` (the session
went idle or is closing) removes its agents. Containers carry no fixed names: a session agent is found by
its labels (`baaaht.session_agent` = its role, with its session's), so `adopt` finds them again after a
container-manager restart.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol

from baaaht.bus.background import backoff
from baaaht.schemas.containers import ContainerSpec, Mount

log = logging.getLogger("baaaht.containers.session_agents")

LABEL_SESSION_AGENT = "baaaht.session_agent"  # the role of a container this supervisor keeps
WORKER = "worker"
WORKSPACE_MOUNT = "/workspace"
FIRST_RESTART, MOST_RESTART = 1.0, 60.0  # seconds
STEADY_AFTER = 60.0  # seconds alive after which an agent's restarts count from the first again

Claim = Callable[[str, str], "str | None"]  # (session, role) -> a pooled container now the session's, or None


class SessionEnded(Exception):
    """Raised by a role's spec or a start: the session is closed or gone (the trigger came late), so it
    needs no agent any more; unlike a failed start, it is not tried again."""


@dataclass(frozen=True)
class AgentSpec:
    """What a role's container is made of: the spec for the policy to judge, and the orchestrator's own
    mounts added after it (the session's workspace), like the agents' bus."""

    spec: ContainerSpec
    own_mounts: tuple[Mount, ...] = ()


class AgentHost(Protocol):
    """The container manager's side: creating, finding and removing session agents' containers."""

    def start(self, session_id: str, role: str, agent: AgentSpec) -> str:
        """Create and start the container (labelled with LABEL_SESSION_AGENT); its id. Raises BusError
        or EngineError; a container that could not be started is removed."""

    def live(self) -> list[tuple[str, str, str]]:
        """(container id, session, role) of every live session agent container."""

    def remove(self, container_id: str) -> str:
        """Remove it (its identity first); "" once it is gone (gone already is fine), else why not."""


def worker_spec(image: str, workspace: str) -> AgentSpec:
    """The session's tool worker: the agent image running `baaaht-agent worker`, its workspace at
    /workspace; everything else is the policy's hardened defaults."""
    return AgentSpec(
        spec=ContainerSpec(image=image, command=["baaaht-agent", "worker"]),
        own_mounts=(Mount(type="bind", source=workspace, target=WORKSPACE_MOUNT),),
    )


@dataclass
class _Agent:
    session_id: str
    role: str
    container_id: str = ""
    started_at: float = 0.0  # monotonic
    failures: int = 0  # starts that failed, or lives that ended early, in a row
    not_before: float = 0.0  # monotonic: no start before this


class SessionAgents:
    def __init__(
        self,
        host: AgentHost,
        specs: dict[str, Callable[[str], AgentSpec]],
        claim: Claim = lambda session_id, role: None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.host = host
        self.specs = specs  # role -> the spec of a session's agent of that role
        self.claim = claim
        self.clock = clock
        self._agents: dict[tuple[str, str], _Agent] = {}
        self._retired: list[str] = []  # containers to remove (their session no longer needs them)
        self._lock = threading.Lock()
        self.wake = threading.Event()  # set when there is something to do

    def ensure(self, session_id: str, role: str) -> None:
        """The session needs its agent of `role` (idempotent, returns at once)."""
        if role not in self.specs:
            raise ValueError(f"no session agent role {role!r} (known: {', '.join(sorted(self.specs))})")
        with self._lock:
            if (session_id, role) in self._agents:
                return
            self._agents[(session_id, role)] = _Agent(session_id, role)
        self.wake.set()

    def container_of(self, session_id: str, role: str) -> str:
        """The session's agent container of `role`, "" while there is none."""
        with self._lock:
            agent = self._agents.get((session_id, role))
            return agent.container_id if agent else ""

    def died(self, container_id: str) -> None:
        """The container's processes ended: its session gets a new agent after the backoff."""
        with self._lock:
            agent = next((a for a in self._agents.values() if a.container_id == container_id), None)
            if agent is None:
                return
            now = self.clock()
            if now - agent.started_at >= STEADY_AFTER:
                agent.failures = 0
            agent.failures += 1
            agent.not_before = now + backoff(agent.failures, FIRST_RESTART, MOST_RESTART)
            agent.container_id = ""
            self._retired.append(container_id)
        log.warning(
            "a session agent died; it is started again",
            extra={"container": container_id, "session": agent.session_id, "role": agent.role},
        )
        self.wake.set()

    def stop_session(self, session_id: str) -> None:
        """The session no longer needs agents (idle, closing, gone): its agents are removed."""
        with self._lock:
            for key in [key for key in self._agents if key[0] == session_id]:
                agent = self._agents.pop(key)
                if agent.container_id:
                    self._retired.append(agent.container_id)
        self.wake.set()

    def adopt(self) -> None:
        """Take up the session agents the engine has (a restart of the container manager), and retire a
        second one of the same session and role."""
        for container_id, session_id, role in self.host.live():
            with self._lock:
                agent = self._agents.setdefault((session_id, role), _Agent(session_id, role))
                if agent.container_id in ("", container_id):
                    agent.container_id, agent.started_at = container_id, self.clock()
                else:
                    self._retired.append(container_id)
        self.wake.set()

    def tend(self) -> None:
        """Remove what is retired, then start each needed agent that has no container and is due."""
        with self._lock:
            retired, self._retired = self._retired, []
        for container_id in retired:
            self._remove(container_id)
        now = self.clock()
        with self._lock:
            due = [a for a in self._agents.values() if not a.container_id and a.not_before <= now]
        for agent in due:
            self._start(agent)

    def next_due(self) -> float | None:
        """When the next waiting start is due (monotonic), None when none waits."""
        with self._lock:
            waiting = [a.not_before for a in self._agents.values() if not a.container_id]
        return min(waiting, default=None)

    def _start(self, agent: _Agent) -> None:
        try:
            spec = self.specs[agent.role](agent.session_id)  # first: it raises SessionEnded for an ended one
            container_id = self.claim(agent.session_id, agent.role) or self.host.start(
                agent.session_id, agent.role, spec
            )
        except SessionEnded as ended:
            with self._lock:
                if self._agents.get((agent.session_id, agent.role)) is agent:
                    del self._agents[(agent.session_id, agent.role)]
            log.info(
                "no session agent for an ended session",
                extra={"session": agent.session_id, "role": agent.role, "why": str(ended)},
            )
            return
        except Exception as exc:  # noqa: BLE001 - one session's failed start must not stop the others
            with self._lock:
                agent.failures += 1
                agent.not_before = self.clock() + backoff(agent.failures, FIRST_RESTART, MOST_RESTART)
            log.warning(
                "a session agent could not be started",
                extra={"session": agent.session_id, "role": agent.role, "error": str(exc)},
            )
            return
        with self._lock:
            still_needed = self._agents.get((agent.session_id, agent.role)) is agent
            if still_needed:
                agent.container_id, agent.started_at = container_id, self.clock()
        if not still_needed:  # its session stopped needing it while it started
            self._remove(container_id)
            return
        log.info(
            "session agent started",
            extra={"container": container_id, "session": agent.session_id, "role": agent.role},
        )

    def _remove(self, container_id: str) -> None:
        problem = self.host.remove(container_id)
        if problem:  # it stays until reconcile or its session's close removes it
            log.warning(
                "a session agent could not be removed", extra={"container": container_id, "error": problem}
            )
