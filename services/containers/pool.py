"""The warm pool: worker containers started ahead of need, each handed to one session when it is claimed.

A pool container is a hardened `baaaht-agent worker` of the agent image, made with the agents' bus but no
session and no identity (it joins the bus unidentified and is refused its work until claimed), labelled
OwnerKind.POOL and with its slot (`baaaht.pool_slot`). Docker cannot add a mount to a running container,
so each slot has a host directory `<run_dir>/pool/<slot>/` beneath `<run_dir>/pool`, which is made a
shared mount of its own; the slot directory is bind-mounted at /workspace with `rslave` propagation.
Claiming binds the session's workspace onto the slot directory (the mount propagates into the running
container), records the claim, attaches the container to its session, writes its identity (the broker is
told) and sends it SIGURG (the worker asks for work again at once; a signal ignored by default, so one
that arrives before the worker set its handler, while Python is still starting, kills nothing).

The claim record (`<run_dir>/pool/claims/<container id>.json`, made with O_EXCL) is what makes a
container a session's: taken once, never given back, so no container serves two sessions. A claimed
container follows its session (reconcile judges it as the session's, the session's close removes it); it
is destroyed, never returned, and its slot is released (unmounted, removed) once the engine no longer has
it. Everything is found again from the engine's labels and the claim records, so a container manager
killed at any point leaks nothing: the next pass removes unclaimed containers that are not running and
slot directories or claims whose container is gone.
"""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Protocol

import msgspec

from baaaht.bus.background import backoff
from baaaht.bus.errors import BusError, invalid, unavailable
from baaaht.common.mounts import MOUNTINFO, mount_points
from baaaht.schemas.config import PoolConfig
from baaaht.schemas.containers import ContainerSpec, ContainerSummary, PoolSlot, PoolStatus
from baaaht.schemas.sessions import SessionInfo
from baaaht.services.containers import session_scope
from baaaht.services.containers.identities import Identities
from baaaht.services.containers.ownership import (
    LABEL_AGENT_BUS,
    LABEL_OWNER,
    OwnerKind,
    install_labels,
    owner_labels,
    owner_of,
)
from baaaht.services.containers.peers import SessionDirectory
from baaaht.services.containers.runtime import EngineError, EngineEvent, NotFound, Runtime
from baaaht.services.containers.session_agents import LABEL_SESSION_AGENT
from baaaht.services.containers.workspaces import WorkspaceError

log = logging.getLogger("baaaht.containers.pool")

POOL_DIR = "pool"  # under the run directory
CLAIMS_DIR = "claims"  # under the pool directory (slot names are hex, never this)
LABEL_POOL_SLOT = "baaaht.pool_slot"
WORKSPACE_TARGET = "/workspace"
WAKE_SIGNAL = "SIGURG"  # the worker asks for its work again at once (ignored by default: harmless early)
REMOVE_TIMEOUT = 5.0
# Engine actions after which an unclaimed pool container can serve nobody and is replaced.
ENDING_ACTIONS = ("die", "stop", "destroy", "oom")
# Pool containers that die unclaimed hold back the next starts: 1 s, doubling, at most a minute; one that
# has run this long resets that.
FIRST_BACKOFF, MAX_BACKOFF, STABLE_AFTER = 1.0, 60.0, 30.0


class SlotMounts(Protocol):
    """The host's mount table, as far as the pool goes (mount(8) for real, a fake in unit tests)."""

    def share(self, path: str) -> None:
        """Make `path` a mount point of its own with shared propagation (idempotent)."""

    def bind(self, source: str, target: str) -> None: ...

    def unmount(self, path: str) -> None:
        """Remove every mount stacked on `path`; nothing when none is."""

    def is_mounted(self, path: str) -> bool: ...


class HostMounts:
    """mount(8) and /proc/self/mountinfo: the container manager runs as root in the host's mount
    namespace, the one the engine makes containers' mounts from."""

    def __init__(self, mountinfo: str = MOUNTINFO) -> None:
        self.mountinfo = mountinfo

    def _mounts(self) -> list[tuple[str, str]]:
        return mount_points(self.mountinfo)

    def _run(self, *argv: str) -> None:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise OSError(f"{' '.join(argv)} failed: {done.stderr.strip() or done.returncode}")

    def share(self, path: str) -> None:
        on_path = [optional for point, optional in self._mounts() if point == path]
        if not on_path:
            self._run("mount", "--bind", path, path)
        elif "shared:" in on_path[-1]:
            return
        self._run("mount", "--make-rshared", path)

    def bind(self, source: str, target: str) -> None:
        self._run("mount", "--bind", source, target)

    def unmount(self, path: str) -> None:
        while self.is_mounted(path):
            self._run("umount", "--lazy", path)

    def is_mounted(self, path: str) -> bool:
        return any(point == path for point, _ in self._mounts())


class Claim(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    container_id: str
    slot: str
    session_id: str
    role: str
    claimed_at: float  # unix seconds


_encode_claim = msgspec.json.Encoder().encode
_decode_claim = msgspec.json.Decoder(Claim).decode


class ClaimStore:
    """One file per claimed container; taking one that exists fails, so a container is claimed once."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def take(self, claim: Claim) -> bool:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(self._path(claim.container_id), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return False
        try:
            os.write(fd, _encode_claim(claim))
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def get(self, container_id: str) -> Claim | None:
        try:
            return _decode_claim(self._path(container_id).read_bytes())
        except (FileNotFoundError, msgspec.DecodeError):
            return None

    def all(self) -> list[Claim]:
        found = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                found.append(_decode_claim(path.read_bytes()))
            except (FileNotFoundError, msgspec.DecodeError):
                continue
        return found

    def remove(self, container_id: str) -> None:
        self._path(container_id).unlink(missing_ok=True)

    def _path(self, container_id: str) -> Path:
        if not container_id.isalnum():
            raise ValueError(f"not a container id: {container_id!r}")
        return self.directory / f"{container_id}.json"


SpecBuilder = Callable[[str, int], ContainerSpec]  # (slot's host directory, live pool containers) -> spec
WorkspaceOf = Callable[[str], str]  # session id -> the host path of its workspace


class Pool:
    def __init__(
        self,
        config: PoolConfig,
        *,
        run_dir: str,
        install_id: str,
        runtime: Runtime | None,
        mounts: SlotMounts,
        identities: Identities,
        sessions: SessionDirectory,
        build_spec: SpecBuilder,
        workspace_of: WorkspaceOf,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.size = config.size
        self.max = config.max
        self.roles = frozenset(config.roles)
        self.root = Path(run_dir) / POOL_DIR
        self.claims = ClaimStore(self.root / CLAIMS_DIR)
        self.install_id = install_id
        self.runtime = runtime
        self.mounts = mounts
        self.identities = identities
        self.sessions = sessions
        self.build_spec = build_spec
        self.workspace_of = workspace_of
        self.clock = clock
        self.monotonic = time.monotonic  # the backoff's clock
        self.problem = ""
        self._labels = {**install_labels(install_id), LABEL_OWNER: OwnerKind.POOL.value}
        self._claim_lock = threading.Lock()  # one claim picks at a time (the claim file decides anyway)
        self.wake = threading.Event()  # set when a pass is due (a claim, a resize, a death)
        self._prepared = False
        self._deaths = 0  # unclaimed pool containers that died in a row
        self._hold_until = 0.0  # monotonic: no start before this

    # -- what is there --------------------------------------------------------------------------------

    def members(self) -> list[ContainerSummary]:
        """Every pool container of this installation the engine has, claimed or not."""
        if self.runtime is None:
            return []
        found = self.runtime.list(self._labels)
        return [c for c in found if owner_of(c.labels, self.install_id).kind is OwnerKind.POOL]

    def status(self) -> PoolStatus:
        claims = {claim.container_id: claim for claim in self.claims.all()}
        slots = []
        for member in self.members():
            claim = claims.get(member.id)
            slots.append(
                PoolSlot(
                    slot=member.labels.get(LABEL_POOL_SLOT, ""),
                    container_id=member.id,
                    state=self._state(member, claim),
                    created=member.created,
                    session_id=claim.session_id if claim else "",
                    role=claim.role if claim else "",
                )
            )
        slots.sort(key=lambda slot: slot.created)
        return PoolStatus(size=self.size, max=self.max, slots=slots, problem=self.problem)

    @staticmethod
    def _state(member: ContainerSummary, claim: Claim | None) -> str:
        if claim is not None:
            return "claimed" if claim.session_id else "ended"  # a claim for no session retires it
        if member.state == "running":
            return "ready"
        return "starting" if member.state == "created" else "ended"

    def claimed(self, session_id: str, role: str = "") -> list[str]:
        """The session's claimed pool containers (of `role`) that the engine still has."""
        live = {member.id for member in self.members()}
        return [
            claim.container_id
            for claim in self.claims.all()
            if claim.session_id == session_id
            and (not role or claim.role == role)
            and claim.container_id in live
        ]

    def unclaimed(self, container: ContainerSummary) -> bool:
        """Whether `container` is an unclaimed pool container (counted against pool.max, not the host's
        quota)."""
        if owner_of(container.labels, self.install_id).kind is not OwnerKind.POOL:
            return False
        return self.claims.get(container.id) is None

    def as_session_view(self, containers: list[ContainerSummary]) -> list[ContainerSummary]:
        """`containers` with each claimed pool container labelled as its session's agent (with the agents'
        bus), so that reconcile, identities and listings take it for one of the session's containers."""
        claims = {claim.container_id: claim for claim in self.claims.all()}
        viewed = []
        for container in containers:
            claim = claims.get(container.id)
            if claim is None or owner_of(container.labels, self.install_id).kind is not OwnerKind.POOL:
                viewed.append(container)
                continue
            labels = {
                **container.labels,
                **owner_labels(self.install_id, OwnerKind.SESSION, claim.session_id, claim.role),
                LABEL_AGENT_BUS: "true",
                LABEL_SESSION_AGENT: claim.role,
            }
            viewed.append(
                msgspec.structs.replace(
                    container, labels=labels, session_id=claim.session_id, role=claim.role
                )
            )
        return viewed

    # -- claim ----------------------------------------------------------------------------------------

    def claim(self, session_id: str, role: str, ctx=None) -> str | None:
        """A ready pool container made the session's `role` agent (started, attached to the session, its
        identity issued, its workspace at /workspace), or None when the pool has none for it (then start
        one cold). A session whose settings tighten the policy gets none: pool containers were judged
        by the host's policy alone. Raises when the session refuses the container (it is destroyed)."""
        if role not in self.roles or self.runtime is None:
            return None
        session = self.sessions.session(session_id, ctx)
        if not self._may_claim_for(session):
            return None
        claim = self._take_ready(session_id, role)
        self.wake.set()  # refill, whatever happens next
        if claim is None:
            return None
        try:
            self.sessions.attach(session_id, claim.container_id, ctx)
            slot_dir = str(self.root / claim.slot)
            self.mounts.bind(self.workspace_of(session_id), slot_dir)
            self.identities.issue(claim.container_id, session_id, role)
            self.runtime.kill(claim.container_id, WAKE_SIGNAL)
        except (BusError, EngineError, OSError, WorkspaceError) as error:
            # Half given to the session: it may hold the session's files or identity, so it never serves
            # anyone again.
            self.discard(claim.container_id)
            if isinstance(error, BusError):
                raise
            message = error.message if isinstance(error, (EngineError, WorkspaceError)) else str(error)
            raise unavailable(
                f"claiming pool container {claim.container_id} for session {session_id} failed: {message}; "
                "it was removed",
                session_id=session_id,
            ) from None
        log.info(
            "pool container claimed",
            extra={"container": claim.container_id, "session": session_id, "role": role, "slot": claim.slot},
        )
        return claim.container_id

    @staticmethod
    def _may_claim_for(session: SessionInfo) -> bool:
        if session.state not in session_scope.OPEN_STATES:
            return False  # a cold start gives the session's refusal in words
        try:
            return not session_scope.policy_override(session)
        except BusError:
            return False  # a cold start names the problem

    def _take_ready(self, session_id: str, role: str) -> Claim | None:
        with self._claim_lock:
            for member in sorted(self.members(), key=lambda m: m.created):
                slot = member.labels.get(LABEL_POOL_SLOT, "")
                if member.state != "running" or not slot:
                    continue
                claim = Claim(
                    container_id=member.id,
                    slot=slot,
                    session_id=session_id,
                    role=role,
                    claimed_at=self.clock(),
                )
                if self.claims.take(claim):
                    return claim
        return None

    # -- size -----------------------------------------------------------------------------------------

    def resize(self, size: int) -> PoolStatus:
        if size > self.max:
            raise invalid(f"pool size {size} is above pool.max ({self.max})", field="size", max=self.max)
        self.size = size
        log.info("pool resized", extra={"size": size})
        self.wake.set()
        return self.status()

    # -- upkeep ---------------------------------------------------------------------------------------

    def wait_for_work(self, timeout: float) -> None:
        """Block until a claim, a resize or an engine event asks for a pass, or `timeout` passes."""
        self.wake.wait(timeout)
        self.wake.clear()

    def on_engine_event(self, event: EngineEvent) -> None:
        if event.kind != "container" or event.action not in ENDING_ACTIONS:
            return
        if owner_of(event.attributes, self.install_id).kind is OwnerKind.POOL:
            self.wake.set()

    def refill(self) -> None:
        """One pass: remove unclaimed containers that cannot serve, release what is gone, start containers
        until `size` are ready or starting (at most pool.max unclaimed), remove the surplus."""
        if self.runtime is None:
            return
        try:
            self._prepare()
        except OSError as error:
            self.problem = f"the pool directory {self.root} could not be made a shared mount: {error}"
            log.error("%s", self.problem)
            return
        members = self.members()
        claims = {claim.container_id: claim for claim in self.claims.all()}
        unclaimed = [m for m in members if m.id not in claims]
        serving = []
        now = self.clock()
        for member in unclaimed:
            if member.state == "running" and self._slot_is_empty(member):
                serving.append(member)
                if now - member.created >= STABLE_AFTER:
                    self._deaths = 0
            else:
                if member.state in ("exited", "dead"):
                    self._died()
                self._retire(member, f"it is {member.state}")
        live = {member.id for member in members}
        for claim in claims.values():
            if claim.container_id not in live:
                self.release(claim.container_id)
        self._remove_stray_slots({m.labels.get(LABEL_POOL_SLOT, "") for m in members})
        while len(serving) > self.size:
            self._retire(serving.pop(), "the pool is smaller now")  # the newest: the oldest are warmest
        if len(serving) < min(self.size, self.max) and self.monotonic() < self._hold_until:
            return  # the problem says why
        self.problem = ""
        while len(serving) < min(self.size, self.max):
            try:
                serving.append(self._start_one(len(serving)))
            except (BusError, EngineError, OSError) as error:
                message = error.message if isinstance(error, (BusError, EngineError)) else str(error)
                if self.problem != message:
                    log.warning("a pool container could not be started: %s", message)
                self.problem = message
                return

    def _died(self) -> None:
        self._deaths += 1
        pause = backoff(self._deaths, FIRST_BACKOFF, MAX_BACKOFF)
        self._hold_until = self.monotonic() + pause
        self.problem = (
            f"{self._deaths} pool container(s) in a row ended before a claim (see their logs); the next "
            f"start waits {pause:g}s"
        )
        log.warning("a pool container ended unclaimed: %s", self.problem)

    def _prepare(self) -> None:
        if self._prepared:
            return
        self.root.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.mounts.share(str(self.root))
        self._prepared = True

    def close(self) -> None:
        """On a clean stop: take back the pool directory's own mount when no pool container is left to
        need it (a claim's bind reaches a running one through it). With some left it stays, and the next
        start finds it shared and stacks nothing (HostMounts.share)."""
        if not self._prepared or self.runtime is None:
            return
        try:
            if self.members():
                return
        except EngineError as error:
            log.warning(
                "the pool directory stays mounted: its containers cannot be listed: %s", error.message
            )
            return
        try:
            self.mounts.unmount(str(self.root))
        except OSError as error:
            log.error("the pool directory %s not unmounted: %s", self.root, error)
            return
        self._prepared = False

    def _slot_is_empty(self, member: ContainerSummary) -> bool:
        """An unclaimed slot has nothing mounted on it (a claim that crashed before its record was written
        cannot have mounted anything, since the record comes first; anything else there is not ours)."""
        slot = member.labels.get(LABEL_POOL_SLOT, "")
        return bool(slot) and not self.mounts.is_mounted(str(self.root / slot))

    def _start_one(self, live: int) -> ContainerSummary:
        assert self.runtime is not None
        slot = secrets.token_hex(6)
        slot_dir = self.root / slot
        slot_dir.mkdir(mode=0o755)
        spec = self.build_spec(str(slot_dir), live)
        spec = msgspec.structs.replace(
            spec, name=f"baaaht-pool-{slot}", labels={**spec.labels, LABEL_POOL_SLOT: slot}
        )
        try:
            container_id, _warnings = self.runtime.create(spec)
        except EngineError:
            slot_dir.rmdir()
            raise
        try:
            self.runtime.start(container_id)
        except EngineError:
            self.discard(container_id)
            raise
        log.info("pool container started", extra={"container": container_id, "slot": slot})
        return self.runtime.list({**self._labels, LABEL_POOL_SLOT: slot})[0]

    def _retire(self, member: ContainerSummary, why: str) -> None:
        """Remove an unclaimed container, unless a claim takes it first: retiring takes its claim record
        (for no session), so the two can never both have it."""
        retired = Claim(
            container_id=member.id,
            slot=member.labels.get(LABEL_POOL_SLOT, ""),
            session_id="",
            role="",
            claimed_at=self.clock(),
        )
        if self.claims.take(retired):
            self.discard(member.id, why)

    def discard(self, container_id: str, why: str = "it was half claimed") -> None:
        """Remove a pool container for good, then release its slot."""
        assert self.runtime is not None
        try:
            self.runtime.remove(container_id, force=True, volumes=True)
        except NotFound:
            pass
        except EngineError as error:
            log.error("pool container %s not removed: %s", container_id, error.message)
            return
        self.identities.revoke(container_id)
        log.info("pool container removed", extra={"container": container_id, "reason": why})
        self.release(container_id)

    def release(self, container_id: str) -> None:
        """After the engine removed a pool container: unmount and remove its slot, drop its claim."""
        claim = self.claims.get(container_id)
        if claim is not None:
            if claim.slot:
                self._remove_slot(claim.slot)
            self.claims.remove(container_id)

    def _remove_stray_slots(self, in_use: set[str]) -> None:
        """Slot directories no pool container (nor claim) has: left by a crash or a removal."""
        if not self.root.is_dir():
            return
        claimed = {claim.slot for claim in self.claims.all()}
        for entry in self.root.iterdir():
            if entry.name != CLAIMS_DIR and entry.name not in in_use and entry.name not in claimed:
                self._remove_slot(entry.name)

    def _remove_slot(self, slot: str) -> None:
        slot_dir = self.root / slot
        try:
            self.mounts.unmount(str(slot_dir))
        except OSError as error:
            log.error("pool slot %s not unmounted: %s", slot, error)
            return
        try:
            slot_dir.rmdir()  # empty once nothing is mounted on it; never a recursive delete near a mount
        except FileNotFoundError:
            pass
        except OSError as error:
            log.error("pool slot directory %s not removed: %s", slot_dir, error)
