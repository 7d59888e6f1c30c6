"""Container manager messages (`container.*`) and the container spec the policy engine judges.

Unset optional fields (None, empty) mean "the hardened default": the container manager fills them
(see services/containers/hardening.py) before the policy engine sees the spec.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import msgspec

from baaaht.schemas import ids
from baaaht.schemas.base import Empty, Event, Request, Response

NonNegative = Annotated[int, msgspec.Meta(ge=0)]
Seconds = Annotated[float, msgspec.Meta(ge=0, description="Seconds, 0 or more.")]
PositiveSeconds = Annotated[float, msgspec.Meta(gt=0, description="Seconds, more than 0.")]
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
HostPort = Annotated[int, msgspec.Meta(ge=0, le=65535, description="0: any free port.")]
AtLeastOnce = Annotated[int, msgspec.Meta(ge=1)]


class Mount(msgspec.Struct, kw_only=True, omit_defaults=True):
    type: Literal["bind", "volume", "tmpfs"]
    target: str
    source: str = ""
    read_only: bool = False
    tmpfs_size: NonNegative = 0
    # A bind mount's propagation: "rslave" lets mounts the host makes beneath the source later appear
    # inside the running container (the warm pool delivers a session's workspace that way).
    propagation: Literal["", "rslave"] = ""


class PortBinding(msgspec.Struct, kw_only=True, omit_defaults=True):
    container_port: Port
    host_port: HostPort = 0
    protocol: Literal["tcp", "udp"] = "tcp"
    host_ip: str = "127.0.0.1"


class Resources(msgspec.Struct, kw_only=True, omit_defaults=True):
    cpus: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    memory: int = 0
    memory_swap: int = 0
    pids: NonNegative = 0


class Healthcheck(msgspec.Struct, kw_only=True, omit_defaults=True):
    test: list[str]
    interval: PositiveSeconds = 30.0
    timeout: PositiveSeconds = 5.0
    retries: AtLeastOnce = 3
    start_period: Seconds = 0.0


class ContainerSpec(msgspec.Struct, kw_only=True, omit_defaults=True):
    image: ids.Image
    name: ids.ContainerName = ""
    entrypoint: list[str] | None = None
    command: list[str] = []
    args: list[str] = []
    env: dict[str, str] = {}
    working_dir: str = ""
    labels: dict[str, str] = {}
    mounts: list[Mount] = []
    ports: list[PortBinding] = []
    networks: list[str] = []
    network_mode: str = ""
    resources: Resources = msgspec.field(default_factory=Resources)
    restart_policy: Literal["no", "always", "unless-stopped", "on-failure"] = "no"
    restart_max_retries: NonNegative = 0
    remove_on_stop: bool = False
    read_only_rootfs: bool | None = None
    user: str = ""
    group_add: list[str] = []
    cap_add: list[str] = []
    cap_drop: list[str] = []
    security_opt: list[str] = []
    privileged: bool = False
    init: bool | None = None
    healthcheck: Healthcheck | None = None


# -- shared shapes ---------------------------------------------------------------------------------

ContainerState = Literal[
    "created", "running", "paused", "restarting", "removing", "exited", "dead", "unknown"
]
HealthStatus = Literal["healthy", "unhealthy", "starting", "unknown"]


class ContainerSummary(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One row of `container.list`: what the engine's sparse listing knows without an inspect."""

    id: str
    name: str
    image: str
    state: ContainerState
    status: str = ""
    session_id: str = ""
    role: str = ""
    created: float = 0.0
    labels: dict[str, str] = {}


class LogLine(msgspec.Struct, kw_only=True, omit_defaults=True, array_like=True):
    stream: Literal["stdout", "stderr"]
    text: str
    time: str = ""


# -- responses (declared before the requests that name them) -----------------------------------------


class CreateResult(Response, kw_only=True):
    id: str
    name: str
    spec: ContainerSpec
    warnings: list[str] = []


class ContainerInfo(Response, kw_only=True):
    id: str
    name: str
    image: str
    state: ContainerState
    session_id: str = ""
    role: str = ""
    labels: dict[str, str] = {}
    created: str = ""
    started_at: str = ""
    finished_at: str = ""
    exit_code: int | None = None
    oom_killed: bool = False
    error: str = ""
    health: HealthStatus | None = None
    pid: int = 0
    restart_count: int = 0


class ContainerListResult(Response, kw_only=True):
    containers: list[ContainerSummary]


class WaitResult(Response, kw_only=True):
    exit_code: int
    error: str = ""


class LogChunk(Response, kw_only=True):
    lines: list[LogLine]


class StatsSample(Response, kw_only=True):
    time: float
    cpu_percent: float = 0.0
    memory_usage: int = 0
    memory_limit: int = 0
    memory_percent: float = 0.0
    net_rx: int = 0
    net_tx: int = 0
    block_read: int = 0
    block_write: int = 0
    pids: int = 0


class ContainerHealthReport(Response, kw_only=True):
    """`has_healthcheck=False`: the status is derived from the state (running = healthy, exit 0 = unknown)."""

    status: HealthStatus
    has_healthcheck: bool
    failing_streak: int = 0
    last_output: str = ""
    state: ContainerState = "unknown"


class ExecResult(Response, kw_only=True):
    """`truncated`: a stream was longer than the container manager returns (1 MiB each)."""

    exit_code: int
    stdout: str = ""
    stderr: str = ""
    truncated: bool = False


class ImageStatus(Response, kw_only=True):
    exists: bool
    id: str = ""


class PullProgress(Response, kw_only=True):
    status: str
    layer: str = ""
    current: int = 0
    total: int = 0


# -- requests --------------------------------------------------------------------------------------


class ContainerCreate(Request, tag="container.create", kw_only=True):
    """Create (not start) a container for a session; unset spec fields get the hardened defaults.

    `agent_bus`: mount the agents' bus directory read-only and hand its address in BAAAHT_BUS."""

    response: ClassVar[type] = CreateResult

    spec: ContainerSpec
    session_id: ids.SessionId
    role: ids.Role = "agent"
    auto_pull: bool = False
    agent_bus: bool = True


class ContainerRef(Request, kw_only=True):
    """Base of every request about one container: `id` is an id, an id prefix or a name."""

    id: ids.ContainerIdOrName


class ContainerStart(ContainerRef, tag="container.start", kw_only=True):
    response: ClassVar[type] = Empty


class ContainerStop(ContainerRef, tag="container.stop", kw_only=True):
    """`timeout`: seconds between SIGTERM and SIGKILL."""

    response: ClassVar[type] = Empty

    timeout: Seconds = 10.0


class ContainerRestart(ContainerRef, tag="container.restart", kw_only=True):
    response: ClassVar[type] = Empty

    timeout: Seconds = 10.0


class ContainerKill(ContainerRef, tag="container.kill", kw_only=True):
    response: ClassVar[type] = Empty

    signal: str = "SIGKILL"


class ContainerPause(ContainerRef, tag="container.pause", kw_only=True):
    response: ClassVar[type] = Empty


class ContainerUnpause(ContainerRef, tag="container.unpause", kw_only=True):
    response: ClassVar[type] = Empty


class ContainerDestroy(ContainerRef, tag="container.destroy", kw_only=True):
    response: ClassVar[type] = Empty

    force: bool = False
    remove_volumes: bool = False


class ContainerWait(ContainerRef, tag="container.wait", kw_only=True):
    """Block until the container stops; lasts as long as the call's deadline allows."""

    response: ClassVar[type] = WaitResult


class ContainerExec(ContainerRef, tag="container.exec", kw_only=True):
    """Run a command in a running container, as the container's own user, and wait for it to end
    (within runtime.timeout); its output comes back whole, as UTF-8 text."""

    response: ClassVar[type] = ExecResult

    command: list[str]
    env: dict[str, str] = {}
    working_dir: str = ""


class ContainerGet(ContainerRef, tag="container.get", kw_only=True):
    response: ClassVar[type] = ContainerInfo


class ContainerList(Request, tag="container.list", kw_only=True):
    """Containers of this installation; every given filter must match."""

    response: ClassVar[type] = ContainerListResult

    session_id: ids.SessionFilter = ""
    labels: dict[str, str] = {}
    states: list[ContainerState] = []


class ContainerLogs(ContainerRef, tag="container.logs", kw_only=True):
    """A streaming call: LogChunk partials. With `follow` it lasts until cancelled or the container ends.

    `tail`: last N lines (-1 = all); `since`/`until`: unix times (0 = unbounded)."""

    response: ClassVar[type] = LogChunk

    follow: bool = False
    tail: Annotated[int, msgspec.Meta(ge=-1, description="-1: all lines.")] = -1
    since: Seconds = 0.0
    until: Seconds = 0.0
    timestamps: bool = False
    stdout: bool = True
    stderr: bool = True


class ContainerStats(ContainerRef, tag="container.stats", kw_only=True):
    response: ClassVar[type] = StatsSample


class ContainerStatsStream(ContainerRef, tag="container.stats_stream", kw_only=True):
    """A streaming call: one StatsSample every `interval` seconds until cancelled or the container ends;
    `interval` is at least 1 (the engine samples once a second)."""

    response: ClassVar[type] = StatsSample

    interval: Annotated[float, msgspec.Meta(ge=1, description="The engine samples once a second.")] = 1.0


class ContainerHealth(ContainerRef, tag="container.health", kw_only=True):
    response: ClassVar[type] = ContainerHealthReport


class ContainerHealthWait(ContainerRef, tag="container.health_wait", kw_only=True):
    """Poll up to `retries` times, `interval` apart; return at once when healthy or definitively unhealthy."""

    response: ClassVar[type] = ContainerHealthReport

    retries: AtLeastOnce = 30
    interval: PositiveSeconds = 1.0


class ContainerImageExists(Request, tag="container.image_exists", kw_only=True):
    response: ClassVar[type] = ImageStatus

    image: ids.Image


class ContainerPull(Request, tag="container.pull", kw_only=True):
    """A streaming call: PullProgress partials until the image is present."""

    response: ClassVar[type] = PullProgress

    image: ids.Image


class VolumeInfo(Response, kw_only=True):
    """A named volume the orchestrator made for a session. Mount it in that session's containers with
    `Mount(type="volume", source=name)`; it is removed when the session is deleted."""

    name: str
    session_id: str = ""
    labels: dict[str, str] = {}
    created: float = 0.0  # unix seconds


class VolumeListResult(Response, kw_only=True):
    volumes: list[VolumeInfo]


class ContainerVolumeCreate(Request, tag="container.volume_create", kw_only=True):
    """Make the session's volume `name` (1-32 lower-case letters and digits), or return it when it exists.
    The session must be active or idle."""

    response: ClassVar[type] = VolumeInfo

    session_id: ids.SessionId
    name: ids.VolumeShortName = "workspace"


class ContainerVolumeList(Request, tag="container.volume_list", kw_only=True):
    """This installation's session volumes, of one session when `session_id` is given."""

    response: ClassVar[type] = VolumeListResult

    session_id: ids.SessionFilter = ""


class OrphanRemoval(msgspec.Struct, kw_only=True, omit_defaults=True):
    id: str
    name: str
    session_id: str = ""
    reason: str


class ReconcileReport(Response, kw_only=True):
    """`skipped` names why nothing was looked at or removed (e.g. the session service was unreachable).
    `removed_volumes`, `failed_volumes`: session volumes whose session no longer exists;
    `removed_workspaces`, `failed_workspaces`: the sessions (no longer existing) whose workspaces went."""

    removed: list[OrphanRemoval] = []
    failed: list[str] = []
    kept: int = 0
    too_young: int = 0
    skipped: str = ""
    removed_volumes: list[str] = []
    failed_volumes: list[str] = []
    removed_workspaces: list[str] = []
    failed_workspaces: list[str] = []


class ContainerReconcile(Request, tag="container.reconcile", kw_only=True):
    """Reconcile with the engine now (it also runs at start and every container.reconcile_interval)."""

    response: ClassVar[type] = ReconcileReport


class PoolSlot(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One warm-pool container: `state` is ready (running, unclaimed), starting, claimed (its session's
    from then on) or ended (gone or exited; removed, and refilled, by the pool)."""

    slot: str
    container_id: str
    state: Literal["starting", "ready", "claimed", "ended"]
    created: float  # unix seconds
    session_id: str = ""
    role: str = ""


class PoolStatus(Response, kw_only=True):
    size: int  # unclaimed containers the pool keeps ready
    max: int  # pool.max: the most unclaimed pool containers at once
    slots: list[PoolSlot] = []
    problem: str = ""  # why the pool cannot fill now (no agent image, no engine, a failed start)


class ContainerPoolStatus(Request, tag="container.pool_status", kw_only=True):
    """The warm pool's containers, claimed ones included."""

    response: ClassVar[type] = PoolStatus


class ContainerPoolResize(Request, tag="container.pool_resize", kw_only=True):
    """Keep `size` unclaimed containers ready from now on (until the container manager restarts: pool.size
    in the config is the default); the operator only. At most pool.max."""

    response: ClassVar[type] = PoolStatus

    size: NonNegative


# -- events (topic = tag) ----------------------------------------------------------------------------


class ContainerEvent(Event, kw_only=True):
    """Fields every `container.*` event carries; `time` is the engine's, in unix seconds."""

    container_id: str
    name: str = ""
    image: str = ""
    session_id: str = ""
    role: str = ""
    time: float = 0.0


class ContainerCreated(ContainerEvent, tag="container.created", kw_only=True):
    pass


class ContainerStarted(ContainerEvent, tag="container.started", kw_only=True):
    pass


class ContainerStopped(ContainerEvent, tag="container.stopped", kw_only=True):
    pass


class ContainerDied(ContainerEvent, tag="container.died", kw_only=True):
    exit_code: int = -1
    oom_killed: bool = False


class ContainerRemoved(ContainerEvent, tag="container.removed", kw_only=True):
    pass


class ContainerPaused(ContainerEvent, tag="container.paused", kw_only=True):
    pass


class ContainerUnpaused(ContainerEvent, tag="container.unpaused", kw_only=True):
    pass


class ContainerHealthChanged(ContainerEvent, tag="container.health_changed", kw_only=True):
    status: HealthStatus = "unknown"


class ImagePulled(Event, tag="image.pulled", kw_only=True):
    image: str
    time: float = 0.0
