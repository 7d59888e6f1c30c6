"""The container manager: the only process that talks to the container engine, offering `container.*`.

Every create is validated, checked against its session (which must exist and be active or idle),
counted against the quota and judged by the policy service, which fills what the request leaves unset
with its hardened defaults (on behalf of the session's owner, under the session's settings) before the
engine sees it; the new container is then attached to its session, and removed again if the session
refuses it. Calls on different containers run concurrently; at most `runtime.max_concurrent_ops` engine
operations are in progress at once (long waits and streams do not hold a slot). Background work (run by
the service runner) checks the engine, reconciles orphans, republishes the engine's events on the bus
and closes streams whose caller has gone.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict
from functools import partial
from typing import Callable, Iterator

import msgspec

from baaaht.agent.tools.errors import ToolError
from baaaht.agent.tools.workspace import Workspace
from baaaht.bus.authorize import OPERATOR
from baaaht.bus.background import Stopping, background
from baaaht.bus.callers import AGENT_ROLES, denied, host_callers_only, principal_of, role_of
from baaaht.bus.client import BusClient
from baaaht.bus.errors import BusError, exhausted, invalid, not_found, precondition, unavailable
from baaaht.bus.service import CallContext, Publisher, Service, on_event, rpc
from baaaht.common.endpoints import Endpoints
from baaaht.common.identity import IdentityStore
from baaaht.schemas.base import Empty
from baaaht.schemas.config import Config
from baaaht.schemas.containers import (
    ContainerCreate,
    ContainerDestroy,
    ContainerExec,
    ContainerGet,
    ContainerHealth,
    ContainerHealthReport,
    ContainerHealthWait,
    ContainerImageExists,
    ContainerInfo,
    ContainerKill,
    ContainerList,
    ContainerListResult,
    ContainerLogs,
    ContainerPause,
    ContainerPoolResize,
    ContainerPoolStatus,
    ContainerPull,
    ContainerReconcile,
    ContainerRestart,
    ContainerSpec,
    ContainerStart,
    ContainerStats,
    ContainerStatsStream,
    ContainerStop,
    ContainerUnpause,
    ContainerVolumeCreate,
    ContainerVolumeList,
    ContainerWait,
    CreateResult,
    ExecResult,
    ImageStatus,
    LogChunk,
    Mount,
    OrphanRemoval,
    PoolStatus,
    PullProgress,
    ReconcileReport,
    StatsSample,
    VolumeInfo,
    VolumeListResult,
    WaitResult,
)
from baaaht.schemas.errors import ErrorCode
from baaaht.schemas.policy import Principal
from baaaht.schemas.sessions import (
    SessionClosed,
    SessionDeleted,
    SessionInfo,
    SessionMessage,
    SessionState,
    SessionUpdated,
)
from baaaht.schemas.tasks import TaskQueued
from baaaht.schemas.tools import TOOLS_QUEUE
from baaaht.schemas.workspaces import (
    ContainerWorkspaceList,
    ContainerWorkspaceRead,
    ContainerWorkspaceWrite,
    WorkspaceData,
    WorkspaceEntries,
    WorkspaceWritten,
)
from baaaht.services.containers import reconcile, session_scope, session_volumes, validation, workspace_files
from baaaht.services.containers.assistants import ASSISTANT, BusConversations, Conversations, assistant_spec
from baaaht.services.containers.engine_errors import maps_engine_errors
from baaaht.services.containers.events import EventTranslator
from baaaht.services.containers.hardening import Identity, UnsafeAddition, agent_bus_for, attach_identity
from baaaht.services.containers.identities import AgentDirectory, Identities, agent_role
from baaaht.services.containers.install import load_or_create
from baaaht.services.containers.ownership import LABEL_SESSION, OwnerKind, install_labels, owner_of
from baaaht.services.containers.peers import (
    BusAgentDirectory,
    BusPolicyGate,
    BusSessionDirectory,
    BusTaskDirectory,
    PolicyGate,
    SessionDirectory,
    TaskDirectory,
)
from baaaht.services.containers.pool import WORKSPACE_TARGET, HostMounts, Pool, SlotMounts
from baaaht.services.containers.runtime import (
    EngineError,
    EngineEvent,
    NotFound,
    Runtime,
    RuntimeConfigError,
    RuntimeUnavailable,
    select_runtime,
)
from baaaht.services.containers.session_agents import (
    LABEL_SESSION_AGENT,
    WORKER,
    AgentSpec,
    SessionAgents,
    SessionEnded,
    worker_spec,
)
from baaaht.services.containers.watchdog import TICK, Watchdog
from baaaht.services.containers.workspaces import LoopMounts, WorkspaceError, Workspaces

log = logging.getLogger("baaaht.containers")

LIVE_STATES = ("created", "running", "paused", "restarting")
# Engine actions after which a container's processes are gone, and with them its identity.
ENDING_ACTIONS = ("die", "stop", "destroy")
ENDING_SESSION_STATES = (SessionState.CLOSING, SessionState.CLOSED)
LOG_BATCH = 256
REMEMBERED_IDS = 4096
ENGINE_CHECK_INTERVAL = 2.0
RECONCILE_RETRY = 5.0  # after a reconcile that had to be skipped
ORPHAN_STOP_TIMEOUT = 5.0
SLOT_WAIT_MAX = 300.0
# The engine samples stats about once a second; a requested interval is met within this slack.
STATS_SLACK = 0.1
POOL_CHECK_INTERVAL = 5.0  # between pool passes nothing asked for (claims and engine events wake it)
POOL_COMMAND = ["baaaht-agent", "worker"]
POOL_PRINCIPAL = Principal(user="service/container", role="worker")  # no session: the host's policy alone
# Sessions no longer needing their agents; a closing session's containers go with its close anyway.
AGENTS_END_STATES = (SessionState.IDLE, SessionState.CLOSING, SessionState.CLOSED)
AGENT_START_TIMEOUT = 60.0  # seconds for creating and starting a session agent's container
TOOL_SWEEP_INTERVAL = 10.0  # seconds between looks for queued tool calls whose task.queued was missed
TEND_WAIT_MAX = 1.0  # seconds the session agents' tending sleeps at most between looks
RESUME_INTERVAL = 5.0  # seconds between tries to resume the assistants (until the session service answers)


@host_callers_only  # agents never manage containers (the broker refuses them first)
@maps_engine_errors
class ContainerService(Service):
    name = "container"
    # Waits, log followers and stats streams each occupy a handler for their whole life; engine work
    # itself is bounded by `runtime.max_concurrent_ops`, not by this.
    concurrency = 64

    def __init__(
        self,
        config: Config,
        runtime: Runtime | None,
        *,
        install_id: str,
        events: Publisher,
        policy: PolicyGate,
        sessions: SessionDirectory,
        identities: IdentityStore,
        agents: AgentDirectory,
        workspaces: Workspaces,
        tasks: TaskDirectory | None = None,
        conversations: Conversations | None = None,
        runtime_problem: str = "",
        clock: Callable[[], float] = time.time,
        mounts: SlotMounts | None = None,
    ):
        self.runtime = runtime
        self.runtime_problem = runtime_problem or "no container runtime"
        self.install_id = install_id
        self.events = events
        self.policy = policy
        self.sessions = sessions
        self.identities = Identities(identities, install_id, agents, clock)
        self.workspaces = workspaces
        self.clock = clock
        self.max_containers = config.policy.max_containers
        self.max_ops = config.runtime.max_concurrent_ops
        self.reconcile_interval = float(config.container.reconcile_interval)
        self.orphan_grace = float(config.container.orphan_grace)
        self.agent_dir = Endpoints.for_config(config.bus).agent_dir
        self.agent_mount = config.container.agent_bus_mount
        self.heartbeat_interval = float(config.bus.heartbeat_interval)
        self.install_labels = install_labels(install_id)
        self.watchdog = Watchdog()
        self._ops = threading.BoundedSemaphore(self.max_ops)
        self._quota_lock = threading.Lock()
        self._reserved = 0
        self._reconcile_lock = threading.Lock()
        self._owned_ids: OrderedDict[str, None] = OrderedDict()
        self._owned_lock = threading.Lock()
        self._engine_ok = False
        self._engine_reason = "the engine has not been checked yet"
        self._next_reconcile = 0.0
        self._translator = EventTranslator(install_id)
        self._events_since = clock()  # the engine's events are republished from here on
        self._seen_at_since: set[tuple[str, str]] = set()
        self.agent_image = config.container.agent_image
        self.pool = Pool(
            config.pool,
            run_dir=Endpoints.for_config(config.bus).run_dir,
            install_id=install_id,
            runtime=runtime,
            mounts=mounts or HostMounts(),
            identities=self.identities,
            sessions=sessions,
            build_spec=self._pool_spec,
            workspace_of=workspaces.ensure,
            clock=clock,
        )
        self.tasks = tasks
        self.assistant = config.assistant
        # Without an image there is nothing to start: said once here rather than at every user message.
        self.autostart = self.assistant.autostart and bool(self.assistant.image or self.agent_image)
        if self.assistant.autostart and not self.autostart:
            log.warning(
                "assistant.autostart is on, but neither assistant.image nor container.agent_image is set"
            )
        self.conversations = conversations
        self._assistants_resumed = False
        self.session_agents = SessionAgents(
            _OwnAgentHost(self), {WORKER: self._worker_spec, ASSISTANT: self._assistant_spec}, self.pool.claim
        )
        self._agents_adopted = False

    @classmethod
    def from_config(cls, config: Config, bus: BusClient) -> "ContainerService":
        try:
            runtime, problem = select_runtime(config), ""
        except RuntimeConfigError as exc:
            raise SystemExit(f"configuration error: {exc}") from None
        except RuntimeUnavailable as exc:
            runtime, problem = None, str(exc)
        timeout = float(config.bus.call_timeout)
        return cls(
            config,
            runtime,
            install_id=load_or_create(config.data_dir),
            events=bus,
            policy=BusPolicyGate(bus, timeout),
            sessions=BusSessionDirectory(bus, timeout),
            identities=IdentityStore(Endpoints.for_config(config.bus).run_dir),
            agents=BusAgentDirectory(bus, timeout),
            workspaces=Workspaces(config.data_dir, config.workspace.size, LoopMounts()),
            tasks=BusTaskDirectory(bus, timeout),
            conversations=BusConversations(bus, timeout),
            runtime_problem=problem,
        )

    # -- life cycle -------------------------------------------------------------------------------

    def on_start(self) -> None:
        self.check_engine()  # registered healthy at once when the engine answers
        # After a host restart the images are there and their mounts are not; one that fails is logged.
        self.workspaces.mount_existing()

    def on_stop(self) -> None:
        self.pool.close()
        if self.runtime is not None:
            self.runtime.close()

    def health_report(self) -> tuple[bool, str]:
        if self.runtime is None:
            return False, self.runtime_problem
        return self._engine_ok, self._engine_reason

    def check_engine(self) -> bool:
        """Ping the engine and record the outcome as this service's health."""
        if self.runtime is None:
            return False
        try:
            description = self.runtime.ping()
        except EngineError as exc:
            if self._engine_ok or self._engine_reason != exc.message:
                log.warning("container engine unavailable: %s", exc.message)
            self._engine_ok, self._engine_reason = False, exc.message
            return False
        if not self._engine_ok:
            log.info("container engine answers: %s", description)
        self._engine_ok, self._engine_reason = True, ""
        return True

    # -- plumbing ---------------------------------------------------------------------------------

    def _runtime(self) -> Runtime:
        if self.runtime is None:
            raise unavailable(self.runtime_problem)
        return self.runtime

    @contextlib.contextmanager
    def _engine(self, ctx: CallContext | None) -> Iterator[Runtime]:
        """One engine operation slot, waited for no longer than the caller's deadline."""
        runtime = self._runtime()
        wait = SLOT_WAIT_MAX if ctx is None else max(0.0, min(ctx.remaining(), SLOT_WAIT_MAX))
        if not self._ops.acquire(timeout=wait):
            raise BusError(
                ErrorCode.TIMEOUT,
                f"no engine operation slot became free in time ({self.max_ops} operations in progress; "
                "runtime.max_concurrent_ops)",
            )
        try:
            yield runtime
        finally:
            self._ops.release()

    def _remember(self, container_id: str) -> None:
        with self._owned_lock:
            self._owned_ids[container_id] = None
            self._owned_ids.move_to_end(container_id)
            while len(self._owned_ids) > REMEMBERED_IDS:
                self._owned_ids.popitem(last=False)

    def _forget(self, container_id: str) -> None:
        with self._owned_lock:
            self._owned_ids.pop(container_id, None)

    def _owned_info(self, ref: str, runtime: Runtime) -> ContainerInfo:
        info = runtime.inspect(ref)
        if not owner_of(info.labels, self.install_id).ours:
            # Not ours: as far as callers are concerned it does not exist.
            raise not_found(f"no container {ref} managed by this installation", id=ref)
        self._remember(info.id)
        return info

    def _owned(self, ref: str, runtime: Runtime) -> str:
        """The full id of a container of this installation; labels never change, so a verified id
        needs no second inspect."""
        with self._owned_lock:
            if ref in self._owned_ids:
                return ref
        return self._owned_info(ref, runtime).id

    # -- create -----------------------------------------------------------------------------------

    @rpc
    def create(self, req: ContainerCreate, ctx: CallContext) -> CreateResult:
        return self._create(req, ctx)

    def _create(
        self,
        req: ContainerCreate,
        ctx: CallContext,
        own_mounts: tuple[Mount, ...] = (),
        own_labels: dict[str, str] | None = None,
    ) -> CreateResult:
        """A create as the RPC does it; the orchestrator's own callers add mounts the policy does not
        judge (a session's workspace, like its own volumes) and labels of the reserved prefix."""
        validation.validate_spec(req.spec)
        if req.agent_bus and req.role not in AGENT_ROLES:
            # Its identity would give the container a role the broker's table does not know, or a host's.
            raise invalid(
                f"a container with the agents' bus has one of the roles {', '.join(sorted(AGENT_ROLES))}, "
                f"not {req.role!r} (or set agent_bus false)",
                field="role",
            )
        session = self._open_session(req.session_id, ctx)
        override = session_scope.policy_override(session)
        # The session's own volumes are the orchestrator's to allow, so the policy does not judge them.
        spec, own_volumes = self._own_volumes(req.spec, req.session_id, ctx)
        bus = self._agent_bus() if req.agent_bus else None
        if req.auto_pull:
            self._ensure_image(req.spec.image, ctx)
        with self._quota_reservation(ctx, req.session_id) as (host_containers, session_containers):
            principal = session_scope.principal_for(session, req.role)
            # The request as made (less its own volumes): the policy fills what it leaves unset.
            enforced, policy_warnings = self.policy.evaluate(
                spec, principal, host_containers, session_containers, override, ctx
            )
            spec = session_volumes.with_own_volumes(spec, enforced, [*own_volumes, *own_mounts])
            if own_labels:
                spec = msgspec.structs.replace(spec, labels={**spec.labels, **own_labels})
            spec = attach_identity(spec, Identity(self.install_id, req.session_id, req.role), bus)
            with self._engine(ctx) as runtime:
                container_id, warnings = runtime.create(spec)
        self._remember(container_id)
        if bus is not None:
            self._issue_or_remove(container_id, req.session_id, req.role)
        self._attach_or_remove(req.session_id, container_id, ctx)
        log.info(
            "container created",
            extra={"container": container_id, "container_name": spec.name, "session": req.session_id},
        )
        return CreateResult(id=container_id, name=spec.name, spec=spec, warnings=policy_warnings + warnings)

    def _open_session(self, session_id: str, ctx: CallContext, what: str = "container") -> SessionInfo:
        """The session the container (or volume) is for; refused unless it exists and is active or idle.
        Without the session service nothing is created (fail closed)."""
        try:
            session = self.sessions.session(session_id, ctx)
        except BusError as exc:
            raise BusError(exc.code, f"{what} creation refused: {exc.message}", exc.details) from None
        session_scope.require_open(session, what)
        return session

    def _own_volumes(self, spec: ContainerSpec, session_id: str, ctx: CallContext):
        """(the spec without the session's own volume mounts, those mounts); another session's volume
        is refused."""
        if not any(m.type == "volume" and m.source for m in spec.mounts):
            return spec, []
        with self._engine(ctx) as runtime:

            def lookup(name: str) -> VolumeInfo | None:
                try:
                    return runtime.inspect_volume(name)
                except NotFound:
                    return None

            return session_volumes.split_own_volumes(spec, self.install_id, session_id, lookup)

    def _issue_or_remove(self, container_id: str, session_id: str, role: str) -> None:
        """Issue the new container's identity before anything can start it; without one it is removed."""
        try:
            self.identities.issue(container_id, session_id, role)
            return
        except OSError as error:
            failure = f"its identity could not be written ({error})"
        problem = self._discard(container_id)
        outcome = f"it could not be removed ({problem})" if problem else "the new container was removed"
        raise unavailable(f"container creation refused: {failure}; {outcome}", container_id=container_id)

    def _attach_or_remove(self, session_id: str, container_id: str, ctx: CallContext) -> None:
        """Record the new container as its session's. If the session refuses it (its max_containers is
        reached, it began closing meanwhile) or cannot be asked, the container is removed again and
        the refusal is the create's answer."""
        try:
            self.sessions.attach(session_id, container_id, ctx)
            return
        except BusError as exc:
            refusal = exc
        problem = self._discard(container_id)
        if problem:
            log.error(
                "a container refused by its session could not be removed",
                extra={"container": container_id, "session": session_id, "error": problem},
            )
            outcome = (
                f"the new container {container_id} could not be removed ({problem}): the session's "
                "close or reconcile removes it"
            )
            details = {**refusal.details, "container_id": container_id}
        else:
            outcome, details = "the new container was removed", refusal.details
        raise BusError(refusal.code, f"container creation refused: {refusal.message}; {outcome}", details)

    def _discard(self, container_id: str) -> str:
        """Remove a container that must not stay; "" once it is gone, else why it is not."""
        try:
            # Not bounded by the caller's deadline: the container must go even if the caller gave up.
            with self._engine(None) as runtime:
                runtime.remove(container_id, force=True, volumes=True)
        except NotFound:
            pass  # gone already (the session's close) is what we want
        except (BusError, EngineError) as exc:
            return exc.message
        self._forget(container_id)
        self.identities.revoke(container_id)
        self.pool.release(container_id)  # a claimed pool container's slot goes with it
        return ""

    def _agent_bus(self):
        try:
            return agent_bus_for(self.agent_dir, self.agent_mount, self.heartbeat_interval)
        except FileNotFoundError:
            raise precondition(
                f"the agents' bus directory {self.agent_dir} does not exist (is the broker running?)",
                path=self.agent_dir,
            ) from None
        except UnsafeAddition as error:
            raise precondition(f"container creation refused: {error}", path=self.agent_dir) from None

    @contextlib.contextmanager
    def _quota_reservation(self, ctx: CallContext, session_id: str) -> Iterator[tuple[int, int]]:
        """Counts the live containers of this installation and holds one place until the create is done.
        Listing under the lock means two creates cannot both take the last place; a container that just
        appeared in the engine may briefly count twice, which errs on the side of refusing."""
        with self._quota_lock:
            with self._engine(ctx) as runtime:
                live = [
                    c
                    for c in self._listed(runtime, {})
                    if c.state in LIVE_STATES and not self.pool.unclaimed(c)
                ]
            host = len(live) + self._reserved
            if host >= self.max_containers:
                raise exhausted(
                    f"container quota reached: {host} of {self.max_containers} containers of this "
                    "installation are live (policy.max_containers)",
                    live=host,
                    limit=self.max_containers,
                )
            self._reserved += 1
        try:
            yield host, sum(1 for c in live if c.session_id == session_id)
        finally:
            with self._quota_lock:
                self._reserved -= 1

    def _ensure_image(self, image: str, ctx: CallContext) -> None:
        with self._engine(ctx) as runtime:
            if runtime.image_exists(image).exists:
                return
        for _progress in self._pull(image, ctx):
            pass

    # -- life-cycle operations ---------------------------------------------------------------------

    @rpc
    def start(self, req: ContainerStart, ctx: CallContext) -> Empty:
        self._bring_to_life(req.id, ctx, lambda runtime, container_id: runtime.start(container_id))
        return Empty()

    def _bring_to_life(self, ref: str, ctx: CallContext, operation: Callable[[Runtime, str], None]) -> None:
        with self._engine(ctx) as runtime:
            info = self._owned_info(ref, runtime)
        self._entitle(info.id, info.labels, ctx)
        if info.state not in LIVE_STATES:
            # Starting a stopped container brings one more to life: it counts against the quota.
            with self._quota_reservation(ctx, info.session_id), self._engine(ctx) as runtime:
                operation(runtime, info.id)
        else:
            with self._engine(ctx) as runtime:
                operation(runtime, info.id)

    @rpc
    def stop(self, req: ContainerStop, ctx: CallContext) -> Empty:
        with self._engine(ctx) as runtime:
            container_id = self._owned(req.id, runtime)
            # Revoked before the stop signal: the agent may go on acting for the whole grace period.
            self.identities.revoke(container_id)
            runtime.stop(container_id, req.timeout)
        return Empty()

    @rpc
    def restart(self, req: ContainerRestart, ctx: CallContext) -> Empty:
        # A restart starts a stopped container too: the same quota as start.
        self._bring_to_life(
            req.id, ctx, lambda runtime, container_id: runtime.restart(container_id, req.timeout)
        )
        return Empty()

    @rpc
    def kill(self, req: ContainerKill, ctx: CallContext) -> Empty:
        if not req.signal:
            raise invalid("signal must name a signal, e.g. SIGTERM or 15", field="signal")
        with self._engine(ctx) as runtime:
            runtime.kill(self._owned(req.id, runtime), req.signal)
        return Empty()

    @rpc
    def pause(self, req: ContainerPause, ctx: CallContext) -> Empty:
        with self._engine(ctx) as runtime:
            runtime.pause(self._owned(req.id, runtime))
        return Empty()

    @rpc
    def unpause(self, req: ContainerUnpause, ctx: CallContext) -> Empty:
        with self._engine(ctx) as runtime:
            runtime.unpause(self._owned(req.id, runtime))
        return Empty()

    @rpc
    def destroy(self, req: ContainerDestroy, ctx: CallContext) -> Empty:
        with self._engine(ctx) as runtime:
            container_id = self._owned(req.id, runtime)
            runtime.remove(container_id, req.force, req.remove_volumes)
        self._forget(container_id)
        self.identities.revoke(container_id)
        self.pool.release(container_id)
        return Empty()

    @rpc
    def wait(self, req: ContainerWait, ctx: CallContext) -> WaitResult:
        with self._engine(ctx) as runtime:
            stream = runtime.wait(self._owned(req.id, runtime))
        with self.watchdog.guard(ctx, stream):
            for result in stream:
                return result
        ctx.check()
        raise unavailable(f"the engine ended the wait on {req.id} without an exit code")

    # -- inspection ---------------------------------------------------------------------------------

    @rpc
    def get(self, req: ContainerGet, ctx: CallContext) -> ContainerInfo:
        with self._engine(ctx) as runtime:
            [info] = self.pool.as_session_view([self._owned_info(req.id, runtime)])
        return info

    @rpc
    def list(self, req: ContainerList, ctx: CallContext) -> ContainerListResult:
        labels = dict(req.labels)
        if req.session_id:
            labels[LABEL_SESSION] = req.session_id
        with self._engine(ctx) as runtime:
            # A claimed pool container is its session's, and listed as such (its own labels name no session).
            found = self.pool.as_session_view(self._listed(runtime, {}))
        found = [c for c in found if all(c.labels.get(key) == value for key, value in labels.items())]
        if req.states:
            found = [c for c in found if c.state in req.states]
        return ContainerListResult(containers=found)

    def _listed(self, runtime: Runtime, labels: dict[str, str]) -> list:
        """This installation's containers carrying `labels`: the engine filters by label, the ownership
        rule decides."""
        found = runtime.list({**labels, **self.install_labels})
        return [c for c in found if owner_of(c.labels, self.install_id).ours]

    @rpc(stream=True)
    def logs(self, req: ContainerLogs, ctx: CallContext) -> Iterator[LogChunk]:
        validation.validate_logs(req)
        with self._engine(ctx) as runtime:
            stream = runtime.logs(self._owned(req.id, runtime), req)
        with self.watchdog.guard(ctx, stream):
            batch = []
            for line in stream:
                batch.append(line)
                # A follower wants each line as it comes; a plain read is sent in batches.
                if req.follow or len(batch) >= LOG_BATCH:
                    yield LogChunk(lines=batch)
                    batch = []
            if batch:
                yield LogChunk(lines=batch)
        ctx.check()

    @rpc
    def stats(self, req: ContainerStats, ctx: CallContext) -> StatsSample:
        with self._engine(ctx) as runtime:
            container_id = self._owned(req.id, runtime)
        # Sampling takes the engine a second or two: it does not hold an operation slot.
        return runtime.stats(container_id)

    @rpc(stream=True)
    def stats_stream(self, req: ContainerStatsStream, ctx: CallContext) -> Iterator[StatsSample]:
        with self._engine(ctx) as runtime:
            stream = runtime.stats_stream(self._owned(req.id, runtime))
        last_sent = 0.0
        with self.watchdog.guard(ctx, stream):
            for sample in stream:
                now = time.monotonic()
                if now - last_sent >= req.interval - STATS_SLACK:
                    last_sent = now
                    yield sample
        ctx.check()

    @rpc
    def exec(self, req: ContainerExec, ctx: CallContext) -> ExecResult:
        validation.validate_exec(req)
        with self._engine(ctx) as runtime:
            container = self._owned_info(req.id, runtime)
        # Judged and audited on behalf of whoever asked, for the container's session.
        for warning in self.policy.evaluate_exec(container, req, principal_of(ctx.caller), ctx):
            log.warning("exec allowed with a policy warning: %s", warning, extra={"container": container.id})
        # The command runs as long as it runs: like stats, it does not hold an operation slot.
        return runtime.exec(container.id, req.command, req.env, req.working_dir)

    @rpc
    def health(self, req: ContainerHealth, ctx: CallContext) -> ContainerHealthReport:
        with self._engine(ctx) as runtime:
            return runtime.health(self._owned(req.id, runtime))

    @rpc
    def health_wait(self, req: ContainerHealthWait, ctx: CallContext) -> ContainerHealthReport:
        with self._engine(ctx) as runtime:
            container_id = self._owned(req.id, runtime)
        for attempt in range(req.retries):
            with self._engine(ctx) as runtime:
                report = runtime.health(container_id)
            if report.status in ("healthy", "unhealthy") or attempt == req.retries - 1:
                return report
            if ctx.cancelled.wait(min(req.interval, max(0.0, ctx.remaining()))):
                break
            ctx.check()
        ctx.check()
        return report

    # -- images -------------------------------------------------------------------------------------

    @rpc
    def image_exists(self, req: ContainerImageExists, ctx: CallContext) -> ImageStatus:
        with self._engine(ctx) as runtime:
            return runtime.image_exists(req.image)

    @rpc(stream=True)
    def pull(self, req: ContainerPull, ctx: CallContext) -> Iterator[PullProgress]:
        yield from self._pull(req.image, ctx)

    def _pull(self, image: str, ctx: CallContext) -> Iterator[PullProgress]:
        with self._engine(ctx) as runtime:
            stream = runtime.pull(image)
        with self.watchdog.guard(ctx, stream):
            yield from stream
        ctx.check()

    # -- session volumes ----------------------------------------------------------------------------

    @rpc
    def volume_create(self, req: ContainerVolumeCreate, ctx: CallContext) -> VolumeInfo:
        name = session_volumes.volume_name(self.install_id, req.session_id, req.name)
        self._open_session(req.session_id, ctx, "volume")
        labels = session_volumes.volume_labels(self.install_id, req.session_id, req.name)
        with self._engine(ctx) as runtime:
            volume = runtime.create_volume(name, labels)
        # The engine hands back an existing volume of that name whatever its labels.
        if not session_volumes.is_session_volume(volume, self.install_id, req.session_id):
            raise BusError(
                ErrorCode.ALREADY_EXISTS,
                f"a volume named {name} exists and was not made by this orchestrator for session "
                f"{req.session_id}",
                {"name": name},
            )
        # Deleted meanwhile, its session.deleted may have looked for volumes before this one existed.
        try:
            deleted = self.sessions.verdict(req.session_id) == "missing"
        except BusError:
            deleted = False  # it was open a moment ago; reconcile removes the volume if it is gone
        if deleted:
            self._remove_volumes(self._runtime(), [volume])
            raise not_found(
                f"volume creation refused: session {req.session_id} was deleted meanwhile",
                session_id=req.session_id,
            )
        log.info("session volume created", extra={"volume": name, "session": req.session_id})
        return volume

    @rpc
    def volume_list(self, req: ContainerVolumeList, ctx: CallContext) -> VolumeListResult:
        labels = {LABEL_SESSION: req.session_id} if req.session_id else {}
        with self._engine(ctx) as runtime:
            return VolumeListResult(volumes=self._session_volumes(runtime, labels))

    def _session_volumes(self, runtime: Runtime, labels: dict[str, str]) -> list[VolumeInfo]:
        found = runtime.list_volumes({**labels, **self.install_labels})
        return [v for v in found if owner_of(v.labels, self.install_id).follows_session]

    @on_event("session.deleted")
    def on_session_deleted(self, event: SessionDeleted) -> None:
        """The session's workspace and volumes go with it, once the session service confirms that it is
        gone (any host peer may publish the event, and files are not lost on its word). One still in use
        (a container its close could not remove), or not confirmed, stays until reconcile."""
        self.identities.revoke_session(event.session_id)  # revoking needs no confirmation
        self.session_agents.stop_session(event.session_id)
        try:
            verdict = self.sessions.verdict(event.session_id)
        except BusError as exc:
            log.warning("files of deleted session %s not removed: %s", event.session_id, exc.message)
            return
        if verdict != "missing":
            log.warning(
                "session.deleted for session %s, which is %s: its files stay", event.session_id, verdict
            )
            return
        self._remove_workspaces([event.session_id])
        if self.runtime is None:
            return
        try:
            volumes = self._session_volumes(self.runtime, {LABEL_SESSION: event.session_id})
        except EngineError as exc:
            log.warning("volumes of deleted session %s not removed: %s", event.session_id, exc.message)
            return
        self._remove_volumes(self.runtime, volumes)

    def _remove_workspaces(self, session_ids: list[str]) -> tuple[list[str], list[str]]:
        """(removed, failed) session ids; a workspace that cannot be unmounted stays until reconcile."""
        removed, failed = [], []
        for session_id in session_ids:
            try:
                self.workspaces.remove(session_id)
            except WorkspaceError as error:
                log.error("workspace not removed: %s", error.message, extra={"session": session_id})
                failed.append(session_id)
                continue
            removed.append(session_id)
        return removed, failed

    # -- workspaces (the operator's files of a session) --------------------------------------------

    @rpc
    def workspace_list(self, req: ContainerWorkspaceList, ctx: CallContext) -> WorkspaceEntries:
        with self._workspace(req.session_id, ctx) as workspace:
            return workspace_files.entries(workspace, req)

    @rpc
    def workspace_read(self, req: ContainerWorkspaceRead, ctx: CallContext) -> WorkspaceData:
        with self._workspace(req.session_id, ctx) as workspace:
            return workspace_files.read(workspace, req)

    @rpc
    def workspace_write(self, req: ContainerWorkspaceWrite, ctx: CallContext) -> WorkspaceWritten:
        with self._workspace(req.session_id, ctx, writing=True) as workspace:
            return workspace_files.write(workspace, req)

    @contextlib.contextmanager
    def _workspace(self, session_id: str, ctx: CallContext, *, writing: bool = False) -> Iterator[Workspace]:
        """The session's workspace, used as its owner; tool errors become the call's. The session must
        exist; a write needs it active or idle, and makes the workspace if it has none yet."""
        session = self.sessions.session(session_id, ctx)
        if writing and session.state not in session_scope.OPEN_STATES:
            raise precondition(
                f"workspace write refused: session {session_id} is {session.state.value}; only an active "
                "or idle session's workspace is written",
                session_id=session_id,
                state=session.state.value,
            )
        try:
            root = self.workspaces.ensure(session_id) if writing else self.workspaces.existing(session_id)
        except WorkspaceError as error:
            raise precondition(error.message, path=error.path) from None
        if root is None:
            raise not_found(
                f"session {session_id} has no workspace yet (its first worker or a write makes it)",
                session_id=session_id,
                workspace="none",
            )
        try:
            with workspace_files.as_owner(root) as workspace:
                yield workspace
        except ToolError as error:
            raise BusError(error.code, error.message, error.details) from None

    # -- identities ---------------------------------------------------------------------------------

    def _entitle(self, container_id: str, labels: dict[str, str], ctx: CallContext | None = None) -> None:
        """Before an agent container (re)starts: its identity while its session is active or idle,
        none otherwise. Raises when the session service cannot be asked."""
        role = agent_role(labels, self.install_id)
        if not role:
            return
        session_id = owner_of(labels, self.install_id).session_id
        try:
            open_session = self.sessions.session(session_id, ctx).state in session_scope.OPEN_STATES
        except BusError as exc:
            if exc.code is not ErrorCode.NOT_FOUND:
                raise
            open_session = False
        if open_session:
            self.identities.issue(container_id, session_id, role)
        else:
            self.identities.revoke(container_id)

    def _follow_identity(self, event: EngineEvent) -> None:
        """The engine's word on a container's processes: gone ends its identity; started again (its
        restart policy) renews it."""
        if event.kind != "container" or not owner_of(event.attributes, self.install_id).ours:
            return
        if event.action in ENDING_ACTIONS:
            self.identities.revoke(event.id)
            if event.action == "die":
                self.session_agents.died(event.id)
        elif event.action == "start":
            try:
                self._entitle(event.id, event.attributes)
            except BusError as exc:
                log.warning(
                    "a restarted agent container was not issued its identity (reconcile does)",
                    extra={"container": event.id, "error": exc.message},
                )

    @on_event("session.updated")
    def on_session_updated(self, event: SessionUpdated) -> None:
        if event.session.state in ENDING_SESSION_STATES:
            self.identities.revoke_session(event.session.id)
        if event.session.state in AGENTS_END_STATES:
            self.session_agents.stop_session(event.session.id)

    @on_event("session.closed")
    def on_session_closed(self, event: SessionClosed) -> None:
        self.identities.revoke_session(event.session_id)
        self.session_agents.stop_session(event.session_id)

    # -- session agents -----------------------------------------------------------------------------

    def _require_agent_session(self, session_id: str) -> None:
        """A session agent (and its workspace) is made only for an open session: SessionEnded for one
        closed or gone (a task.queued or sweep that came after its close or delete), BusError when the
        session service cannot be asked (tried again after the backoff)."""
        ctx = CallContext(deadline=time.time() + AGENT_START_TIMEOUT)
        try:
            self._open_session(session_id, ctx, "session agent")
        except BusError as error:
            if error.code in (ErrorCode.FAILED_PRECONDITION, ErrorCode.NOT_FOUND):
                raise SessionEnded(error.message) from None
            raise

    def _worker_spec(self, session_id: str) -> AgentSpec:
        if not self.agent_image:
            raise precondition(
                "no worker can be started: container.agent_image is not set (the agent image's reference)"
            )
        self._require_agent_session(session_id)
        try:
            workspace = self.workspaces.ensure(session_id)
        except WorkspaceError as error:
            raise unavailable(f"no worker can be started: {error}", session_id=session_id) from None
        return worker_spec(self.agent_image, workspace)

    def _assistant_spec(self, session_id: str) -> AgentSpec:
        self._require_agent_session(session_id)
        try:
            return AgentSpec(spec=assistant_spec(self.assistant, self.agent_image))
        except ValueError as error:
            raise precondition(f"no assistant can be started: {error}", session_id=session_id) from None

    def start_session_agent(self, session_id: str, role: str, agent: AgentSpec) -> str:
        """Create and start a session's agent container, like `create` and `start` of a caller (the
        session's checks, quota, policy, identity); one that does not start is removed again."""
        ctx = CallContext(deadline=time.time() + AGENT_START_TIMEOUT)
        request = ContainerCreate(spec=agent.spec, session_id=session_id, role=role, agent_bus=True)
        created = self._create(request, ctx, agent.own_mounts, {LABEL_SESSION_AGENT: role})
        try:
            self._bring_to_life(created.id, ctx, lambda runtime, container_id: runtime.start(container_id))
        except (BusError, EngineError):
            self._discard(created.id)
            raise
        return created.id

    def live_session_agents(self) -> list[tuple[str, str, str]]:
        with self._engine(None) as runtime:
            found = self._listed(runtime, {})
        running = {c.id: c for c in found if c.state == "running"}
        claimed = [
            (claim.container_id, claim.session_id, claim.role)
            for claim in self.pool.claims.all()
            if claim.session_id  # not one being retired
        ]
        return [
            (c.id, c.session_id, c.labels[LABEL_SESSION_AGENT])
            for c in running.values()
            if c.labels.get(LABEL_SESSION_AGENT)
        ] + [found for found in claimed if found[0] in running]

    @on_event("task.queued")
    def on_task_queued(self, event: TaskQueued) -> None:
        """A tool call waits: its session gets a worker (if it has none)."""
        if event.queue == TOOLS_QUEUE and event.session_id and self.runtime is not None:
            self.session_agents.ensure(event.session_id, WORKER)

    @on_event("session.message")
    def on_session_message(self, event: SessionMessage) -> None:
        """A user message: its session gets its assistant (if it has none), with assistant.autostart."""
        if event.message.role == "user" and self.autostart and self.runtime is not None:
            self.session_agents.ensure(event.session_id, ASSISTANT)

    @background(every=RESUME_INTERVAL)
    def resume_assistants(self) -> None:
        """Once after a start: a session whose newest user message has no answer (it came while no
        assistant ran, or its turn was cut by a host restart) gets its assistant back."""
        if self._assistants_resumed or self.conversations is None or self.runtime is None:
            return
        if self.autostart:
            for session_id in self.conversations.awaiting_answer():  # BusError: tried again later
                self.session_agents.ensure(session_id, ASSISTANT)
        self._assistants_resumed = True

    @background(every=TOOL_SWEEP_INTERVAL)
    def sweep_tool_calls(self) -> None:
        """Sessions with tool calls queued get a worker, whether or not their task.queued came through."""
        if self.tasks is None or self.runtime is None:
            return
        for session_id in self.tasks.queued_sessions(TOOLS_QUEUE):
            self.session_agents.ensure(session_id, WORKER)

    @background
    def tend_session_agents(self, stopping: Stopping) -> None:
        """Start, restart and remove sessions' agents (session_agents.py); first, take up those the
        engine has from before a restart."""
        with stopping.waking(self.session_agents.wake):  # a stop ends the sleep below at once
            while not stopping.is_set():
                if self._engine_ok and not self._agents_adopted:
                    self.session_agents.adopt()
                    self._agents_adopted = True
                if self._agents_adopted:
                    self.session_agents.tend()
                # Until the engine answers and the agents are taken up nothing is started: a start due now
                # must not make this loop look again at once, round after round (a busy spin).
                due = self.session_agents.next_due() if self._agents_adopted else None
                wait = TEND_WAIT_MAX if due is None else max(0.0, min(TEND_WAIT_MAX, due - time.monotonic()))
                if self.session_agents.wake.wait(wait):
                    self.session_agents.wake.clear()

    # -- warm pool ----------------------------------------------------------------------------------

    @rpc
    def pool_status(self, req: ContainerPoolStatus, ctx: CallContext) -> PoolStatus:
        self._runtime()
        return self.pool.status()

    @rpc
    def pool_resize(self, req: ContainerPoolResize, ctx: CallContext) -> PoolStatus:
        if role_of(ctx.caller) != OPERATOR:
            raise denied("only the operator may resize the warm pool", ctx.caller)
        self._runtime()
        return self.pool.resize(req.size)

    def _pool_spec(self, slot_dir: str, live: int) -> ContainerSpec:
        """A pool container's spec: the agent image's worker, hardened by the host's policy (no session's
        settings: a session that has any is never given a pool container), its slot at /workspace."""
        requested = ContainerSpec(image=self.agent_image, command=POOL_COMMAND)
        spec, warnings = self.policy.evaluate(requested, POOL_PRINCIPAL, live, 0, {})
        for warning in warnings:
            log.warning("pool container allowed with a policy warning: %s", warning)
        # The slot is the orchestrator's own directory, added after the policy like the agents' bus.
        slot = Mount(type="bind", source=slot_dir, target=WORKSPACE_TARGET, propagation="rslave")
        spec = msgspec.structs.replace(spec, mounts=[*spec.mounts, slot])
        return attach_identity(
            spec, Identity(self.install_id, "", "worker", OwnerKind.POOL), self._agent_bus()
        )

    # -- reconcile ----------------------------------------------------------------------------------

    @rpc
    def reconcile(self, req: ContainerReconcile, ctx: CallContext) -> ReconcileReport:
        return self.reconcile_now()

    def reconcile_now(self) -> ReconcileReport:
        """Stop and remove this installation's orphans. Nothing is removed unless every session that
        decides a container's fate could be looked up."""
        # Not bounded by runtime.max_concurrent_ops: reconcile runs one at a time (the lock) and must
        # not wait behind a full queue of callers' operations to remove what nobody owns.
        with self._reconcile_lock:
            runtime = self._runtime()
            # A claimed pool container is judged as its session's.
            containers = self.pool.as_session_view(runtime.list(self.install_labels))
            volumes = runtime.list_volumes(self.install_labels)
            workspaces = self.workspaces.images(self.install_id)
            now = self.clock()
            try:
                verdicts = {
                    session: self.sessions.verdict(session)
                    for session in reconcile.sessions_to_check(
                        [*containers, *volumes, *workspaces], self.install_id, now, self.orphan_grace
                    )
                }
            except BusError as exc:
                reason = (
                    f"the session service could not be asked ({exc.code.value}: {exc.message}); "
                    "nothing removed"
                )
                log.warning("reconcile skipped: %s", reason)
                self.identities.settle(live_of(containers), {})  # what is gone has no identity
                return ReconcileReport(skipped=reason)
            decision = reconcile.plan(containers, self.install_id, verdicts, now, self.orphan_grace)
            removed, failed = [], []
            for removal in decision.remove:
                container = removal.target

                def remove_orphan(container=container) -> None:
                    runtime.stop(container.id, ORPHAN_STOP_TIMEOUT)
                    runtime.remove(container.id, force=True, volumes=True)

                if not removed_from_engine(remove_orphan, f"orphan {container.id}"):
                    failed.append(container.id)
                    continue
                self._forget(container.id)
                self.pool.release(container.id)
                log.info(
                    "orphan removed",
                    extra={
                        "container": container.id,
                        "container_name": container.name,
                        "reason": removal.reason,
                    },
                )
                removed.append(
                    OrphanRemoval(
                        id=container.id,
                        name=container.name,
                        session_id=container.session_id,
                        reason=removal.reason,
                    )
                )
            gone = {removal.id for removal in removed}
            self.identities.settle(live_of(c for c in containers if c.id not in gone), verdicts)
            # After the containers: a volume an orphan container used is free by now.
            orphan_volumes = reconcile.plan(
                volumes, self.install_id, verdicts, now, self.orphan_grace, reconcile.VOLUME_ENDS
            )
            removed_volumes, failed_volumes = self._remove_volumes(
                runtime, [removal.target for removal in orphan_volumes.remove]
            )
            # Like volumes, a workspace outlives its session's close and goes once the session is gone.
            orphan_workspaces = reconcile.plan(
                workspaces, self.install_id, verdicts, now, self.orphan_grace, reconcile.VOLUME_ENDS
            )
            removed_workspaces, failed_workspaces = self._remove_workspaces(
                [removal.target.session_id for removal in orphan_workspaces.remove]
            )
            return ReconcileReport(
                removed=removed,
                failed=failed,
                kept=decision.kept,
                too_young=decision.too_young,
                removed_volumes=removed_volumes,
                failed_volumes=failed_volumes,
                removed_workspaces=removed_workspaces,
                failed_workspaces=failed_workspaces,
            )

    def _remove_volumes(self, runtime: Runtime, volumes: list[VolumeInfo]) -> tuple[list[str], list[str]]:
        """(removed, failed) volume names; one still in use by a container fails until that is gone."""
        removed, failed = [], []
        for volume in volumes:
            if not removed_from_engine(partial(runtime.remove_volume, volume.name), f"volume {volume.name}"):
                failed.append(volume.name)
                continue
            log.info("session volume removed", extra={"volume": volume.name, "session": volume.session_id})
            removed.append(volume.name)
        return removed, failed

    # -- background work ------------------------------------------------------------------------------

    @background(every=ENGINE_CHECK_INTERVAL)
    def maintain(self) -> None:
        """Check the engine; while it answers, reconcile every `container.reconcile_interval` (sooner
        again after a reconcile that had to be skipped); tell the broker the identity changes it missed."""
        self.identities.tell_untold()
        if not self.check_engine() or time.monotonic() < self._next_reconcile:
            return
        try:
            report = self.reconcile_now()
        except (BusError, EngineError) as exc:
            log.warning("reconcile failed: %s", exc.message)
            report = ReconcileReport(skipped=exc.message)
        delay = RECONCILE_RETRY if report.skipped else self.reconcile_interval
        self._next_reconcile = time.monotonic() + min(delay, self.reconcile_interval)

    @background
    def keep_pool(self, stopping: Stopping) -> None:
        """Keep the warm pool filled: a pass at start (which also tidies what a crash left), after every
        claim, resize and death of a pool container, and every POOL_CHECK_INTERVAL."""
        with stopping.waking(self.pool.wake):  # a stop ends the wait below at once, not after 5 s
            while not stopping.is_set():
                if self._engine_ok and self.agent_image:
                    self.pool.refill()
                elif not self.agent_image:
                    self.pool.problem = "container.agent_image is not set: the pool has no image to start"
                self.pool.wait_for_work(POOL_CHECK_INTERVAL)

    @background(every=TICK)
    def close_abandoned_streams(self) -> None:
        self.watchdog.close_abandoned()

    @background
    def republish_engine_events(self, stopping: Stopping) -> None:
        """Republish the engine's events; a broken feed raises and is followed again (with backoff)
        from the last event seen. While the engine is down there is nothing to follow."""
        if self.runtime is None or not self._engine_ok:
            return
        with stopping.closing(self.runtime.events(self._events_since)) as stream:
            for event in stream:
                key = (event.id, event.action)
                if event.time < self._events_since or (
                    event.time == self._events_since and key in self._seen_at_since
                ):
                    continue  # replayed after a reconnect
                if event.time > self._events_since:
                    self._events_since, self._seen_at_since = event.time, set()
                self._seen_at_since.add(key)
                self._follow_identity(event)
                self.pool.on_engine_event(event)
                published = self._translator.translate(event)
                if published is not None:
                    self.events.publish(published)


class _OwnAgentHost:
    """The session agents' AgentHost: the container manager's own operations."""

    def __init__(self, service: ContainerService):
        self.start = service.start_session_agent
        self.live = service.live_session_agents
        self.remove = service._discard


def live_of(containers) -> list[tuple[str, dict[str, str]]]:
    """(id, labels) of the containers that may be running (their identities are settled by reconcile)."""
    return [(c.id, c.labels) for c in containers if c.state in LIVE_STATES]


def removed_from_engine(remove: Callable[[], None], what: str) -> bool:
    """Run a removal; True once the thing is gone (gone already is what was wanted), else False, logged."""
    try:
        remove()
    except NotFound:
        pass
    except EngineError as exc:
        log.error("could not remove %s: %s", what, exc.message)
        return False
    return True
