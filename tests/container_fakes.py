"""Written fakes for the container service's outside world: the runtime and the policy and session
peers (the bus is the test kit's FakeBus). They keep state like the real things, so tests can check
outcomes."""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any, Callable

import msgspec

from baaaht.bus.errors import BusError, exhausted, not_found, precondition
from baaaht.bus.testing import FakeStream, Recorded
from baaaht.common.policy import document
from baaaht.schemas.containers import (
    ContainerHealthReport,
    ContainerInfo,
    ContainerLogs,
    ContainerSpec,
    ContainerSummary,
    ExecResult,
    ImageStatus,
    LogLine,
    PullProgress,
    StatsSample,
    VolumeInfo,
    WaitResult,
)
from baaaht.schemas.policy import Principal
from baaaht.schemas.sessions import SessionContainer, SessionInfo, SessionSettings, SessionState
from baaaht.services.containers.ownership import LABEL_ROLE, LABEL_SESSION
from baaaht.services.containers.runtime import (
    Conflict,
    EngineEvent,
    EngineUnavailable,
    NotFound,
    WrongState,
)
from baaaht.services.policy import defaults

HARMLESS_SIGNALS = ("SIGURG", "SIGUSR1", "SIGUSR2", "SIGHUP")  # the fake's processes handle these and live on


class FakeRuntime:
    name = "fake"

    def __init__(self, images: tuple[str, ...] = ("busybox:1",)):
        self.images = set(images)
        self.containers: dict[str, dict[str, Any]] = {}
        self.volumes: dict[str, VolumeInfo] = {}
        self.waits: dict[str, list[FakeStream]] = {}
        self.log_streams: list[FakeStream] = []
        self.event_streams: Recorded[FakeStream] = Recorded()  # tests wait on the follower's streams
        self.down_reason = ""
        self.health_script: list[ContainerHealthReport] = []
        self.calls: list[tuple[str, str]] = []
        self.signals: list[tuple[str, str]] = []
        self.gate: threading.Event | None = None  # when set, start() blocks until the gate opens
        self.in_flight = 0
        self.max_in_flight = 0
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    # helpers for tests
    def add(self, labels: dict[str, str], state: str = "running", created: float | None = None) -> str:
        container_id = f"{next(self._ids):064x}"
        self.containers[container_id] = dict(
            spec=ContainerSpec(image="busybox:1", labels=labels),
            name=f"c{container_id[-4:]}",
            state=state,
            labels=labels,
            created=time.time() if created is None else created,
        )
        return container_id

    def exit(self, container_id: str, code: int) -> None:
        self.containers[container_id]["state"] = "exited"
        for stream in self.waits.pop(container_id, []):
            stream.put(WaitResult(exit_code=code))

    def _get(self, ref: str) -> tuple[str, dict]:
        self._check_up()
        for container_id, c in self.containers.items():
            if ref in (container_id, c["name"]) or (len(ref) >= 4 and container_id.startswith(ref)):
                return container_id, c
        raise NotFound(f"No such container: {ref}", target=ref)

    def _check_up(self) -> None:
        if self.down_reason:
            raise EngineUnavailable(self.down_reason)

    def _record(self, op: str, target: str) -> None:
        with self._lock:
            self.calls.append((op, target))

    # Runtime protocol
    def ping(self) -> str:
        self._check_up()
        return "fake engine"

    def create(self, spec: ContainerSpec) -> tuple[str, list[str]]:
        self._check_up()
        self._record("create", spec.name)
        if spec.image not in self.images:
            raise NotFound(f"No such image: {spec.image}", target=spec.image)
        if any(c["name"] == spec.name for c in self.containers.values()):
            raise Conflict(f"name {spec.name} in use", target=spec.name)
        container_id = self.add(dict(spec.labels), state="created")
        self.containers[container_id].update(spec=spec, name=spec.name)
        return container_id, []

    def start(self, container: str) -> None:
        container_id, c = self._get(container)
        self._record("start", container_id)
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.gate is not None:
                assert self.gate.wait(10), "test gate never opened"
            c["state"] = "running"
        finally:
            with self._lock:
                self.in_flight -= 1

    def stop(self, container: str, timeout: float) -> None:
        container_id, c = self._get(container)
        self._record("stop", container_id)
        if c["state"] == "running":
            self.exit(container_id, 143)

    def restart(self, container: str, timeout: float) -> None:
        self._get(container)[1]["state"] = "running"

    def kill(self, container: str, signal: str) -> None:
        container_id, _ = self._get(container)
        self._record("kill", container_id)
        self.signals.append((container_id, signal))
        if signal not in HARMLESS_SIGNALS:
            self.exit(container_id, 137)

    def pause(self, container: str) -> None:
        self._get(container)[1]["state"] = "paused"

    def unpause(self, container: str) -> None:
        self._get(container)[1]["state"] = "running"

    def remove(self, container: str, force: bool, volumes: bool) -> None:
        container_id, c = self._get(container)
        self._record("remove", container_id)
        if c["state"] == "running" and not force:
            raise WrongState("cannot remove a running container", target=container)
        del self.containers[container_id]

    def wait(self, container: str) -> FakeStream:
        container_id, c = self._get(container)
        stream = FakeStream()
        if c["state"] == "exited":
            stream.put(WaitResult(exit_code=0))
        else:
            self.waits.setdefault(container_id, []).append(stream)
        return stream

    def inspect(self, container: str) -> ContainerInfo:
        container_id, c = self._get(container)
        labels = c["labels"]
        return ContainerInfo(
            id=container_id,
            name=c["name"],
            image=c["spec"].image,
            state=c["state"],
            labels=labels,
            session_id=labels.get(LABEL_SESSION, ""),
            role=labels.get(LABEL_ROLE, ""),
        )

    def health(self, container: str) -> ContainerHealthReport:
        self._get(container)
        if self.health_script:
            return self.health_script.pop(0)
        return ContainerHealthReport(status="starting", has_healthcheck=True, state="running")

    def list(self, labels: dict[str, str]) -> list[ContainerSummary]:
        self._check_up()
        return [
            ContainerSummary(
                id=container_id,
                name=c["name"],
                image=c["spec"].image,
                state=c["state"],
                labels=c["labels"],
                session_id=c["labels"].get(LABEL_SESSION, ""),
                created=c["created"],
            )
            for container_id, c in self.containers.items()
            if all(c["labels"].get(k) == v for k, v in labels.items())
        ]

    def logs(self, container: str, options: ContainerLogs) -> FakeStream:
        self._get(container)
        stream = FakeStream([LogLine(stream="stdout", text=f"line {i}") for i in range(3)])
        if not options.follow:
            stream.end()
        self.log_streams.append(stream)
        return stream

    def exec(self, container: str, command: list[str], env: dict[str, str], working_dir: str) -> ExecResult:
        container_id, c = self._get(container)
        self._record("exec", container_id)
        if c["state"] != "running":
            raise WrongState(f"container {container_id} is not running", target=container_id)
        return ExecResult(exit_code=0, stdout=f"{command} {env} {working_dir}")

    def stats(self, container: str) -> StatsSample:
        self._get(container)
        return StatsSample(time=time.time(), pids=1)

    def stats_stream(self, container: str) -> FakeStream:
        self._get(container)
        return FakeStream([StatsSample(time=float(i), pids=1) for i in range(3)], ended=True)

    def image_exists(self, image: str) -> ImageStatus:
        self._check_up()
        return ImageStatus(exists=image in self.images, id="sha256:x" if image in self.images else "")

    def pull(self, image: str) -> FakeStream:
        self._check_up()
        self.images.add(image)
        return FakeStream([PullProgress(status="Downloaded")], ended=True)

    def create_volume(self, name: str, labels: dict[str, str]) -> VolumeInfo:
        self._check_up()
        # Like the engine: an existing volume of that name is returned as it is.
        return self.volumes.setdefault(
            name, VolumeInfo(name=name, labels=dict(labels), session_id=labels.get(LABEL_SESSION, ""))
        )

    def inspect_volume(self, name: str) -> VolumeInfo:
        self._check_up()
        if name not in self.volumes:
            raise NotFound(f"no such volume: {name}", target=name)
        return self.volumes[name]

    def list_volumes(self, labels: dict[str, str]) -> list[VolumeInfo]:
        self._check_up()
        return [v for v in self.volumes.values() if all(v.labels.get(k) == val for k, val in labels.items())]

    def remove_volume(self, name: str) -> None:
        self.inspect_volume(name)
        self._record("remove volume", name)
        if any(m.source == name for c in self.containers.values() for m in c["spec"].mounts):
            raise WrongState(f"volume {name} is in use", target=name)
        del self.volumes[name]

    def events(self, since: float) -> FakeStream:
        self._check_up()
        stream = FakeStream()
        self.event_streams.append(stream)
        return stream

    def close(self) -> None:
        pass


def hardened(spec: ContainerSpec, memory: int, cpus: float, pids: int) -> ContainerSpec:
    """The spec with what it leaves unset filled as the policy does it, under these default limits."""
    quotas = {"max_memory": memory, "default_cpus": cpus, "default_pids": pids}
    policy = document.load({"quotas": quotas}, document.HostDefaults(max_memory=memory, max_containers=10))
    return defaults.fill(spec, policy)[0]


class FakePolicy:
    """Allows everything (returning the spec, optionally changed by `enforce`) unless told otherwise."""

    def __init__(self):
        self.seen: list[tuple[ContainerSpec, Principal, int, int, dict[str, Any]]] = []
        self.execs: list[tuple[str, list[str], Principal]] = []
        self.error: BusError | None = None
        self.enforce = None

    def evaluate(self, spec, principal, host_containers, session_containers, override, ctx=None):
        self.seen.append((spec, principal, host_containers, session_containers, override))
        if self.error is not None:
            raise self.error
        return (self.enforce(spec) if self.enforce else spec), []

    def evaluate_exec(self, container, request, principal, ctx=None):
        self.execs.append((container.id, request.command, principal))
        if self.error is not None:
            raise self.error
        return []


def session_info(
    session_id: str = "s1", state: SessionState = SessionState.ACTIVE, owner: str = "alice", **settings
) -> SessionInfo:
    return SessionInfo(
        id=session_id,
        state=state,
        owner=owner,
        settings=SessionSettings(**settings),
        created_at=0.0,
        updated_at=0.0,
        last_activity_at=0.0,
    )


class FakeSessions:
    """The session service's answers: sessions by id; attaching follows its rules (active or idle
    sessions only, at most max_containers, 0 meaning no limit here). `error` is raised by every call
    (the service cannot be asked); `before_attach` runs first in `attach`, for what happens meanwhile."""

    def __init__(self, *sessions: SessionInfo):
        self.sessions = {s.id: s for s in sessions}
        self.error: BusError | None = None
        self.before_attach: Callable[[], None] | None = None

    def verdict(self, session_id: str) -> str:
        if self.error is not None:
            raise self.error
        found = self.sessions.get(session_id)
        if found is None:
            return "missing"
        return "closed" if found.state is SessionState.CLOSED else "open"

    def session(self, session_id: str, ctx=None) -> SessionInfo:
        if self.error is not None:
            raise self.error
        if session_id not in self.sessions:
            raise not_found(f"no session {session_id}", session_id=session_id)
        return self.sessions[session_id]

    def attach(self, session_id: str, container_id: str, ctx=None) -> None:
        if self.before_attach is not None:
            self.before_attach()
        found = self.session(session_id)
        if found.state not in (SessionState.ACTIVE, SessionState.IDLE):
            raise precondition(
                f"cannot attach a container to session {session_id}: it is {found.state.value}",
                session_id=session_id,
                state=found.state.value,
            )
        limit = found.settings.max_containers
        if limit and len(found.containers) >= limit:
            raise exhausted(
                f"session {session_id} already has {len(found.containers)} containers, its limit "
                f"max_containers is {limit}",
                session_id=session_id,
                limit=limit,
            )
        self.sessions[session_id].containers.append(SessionContainer(id=container_id, attached_at=0.0))


def engine_event(action: str, container_id: str, labels: dict[str, str], **attrs: str) -> EngineEvent:
    return EngineEvent(
        kind="container", action=action, id=container_id, time=time.time(), attributes={**labels, **attrs}
    )


def replace(spec: ContainerSpec, **changes) -> ContainerSpec:
    return msgspec.structs.replace(spec, **changes)


class FakeAgents:
    """The broker's `bus.agents.update` as the container manager sees it: records each container it was
    told about; `error` is raised instead while the broker cannot be asked."""

    def __init__(self):
        self.told: Recorded[str] = Recorded()
        self.error: BusError | None = None

    def updated(self, container_id: str) -> None:
        if self.error is not None:
            raise self.error
        self.told.append(container_id)
