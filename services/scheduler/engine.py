"""The scheduler's one thread of change: commands from RPC threads, timers, dispatch; then a writer
thread: commit, answer, fan-out.

Every change goes through `call(apply)` (or `defer(apply)`, whose Deferred the runner answers from the
writer's thread): the command is queued to the engine's thread, which takes every
command waiting at once (up to MAX_BATCH), applies them to the Core in order, fires the timers that are
due, dispatches, and encodes what the turn changed (the rows as they are at its end). The writer thread
writes the turns handed to it in order, every turn waiting at once in one transaction: one commit, one
fsync for the lot (group commit). Only then are those turns' callers answered, their events published
and their cancels and finished tasks pushed, so nothing is acknowledged or announced before it is
durable. The engine does not wait for the commit: while the writer's fsync runs it goes on with the
next commands (a worker's outcome frees its slot and the next lease goes out without waiting for the
disk), so the turns a commit carries are as many as arrived during the one before.

New leases alone go out before the commit, so that the worker starts while the fsync runs (an idle
worker gets a task in less time than a commit takes): a lease whose commit then fails, or whose
scheduler dies first, is unknown to the store, and its worker's reports are refused
(FAILED_PRECONDITION); the task runs again from what the store holds. That is the at-least-once
execution the scheduler promises anyway; completions are still recorded once, and only with or after
the lease's own commit (turns are written in their order). The engine waits for the next command or the
next timer, whichever comes first: there is no polling interval.

A commit that fails leaves the Core ahead of the store: every command of the turns it carried, and of
the turns made on top of them before the Core is rebuilt from the store, is answered UNAVAILABLE (what
was only told, with no caller to try again, is applied again to the rebuilt Core), and the open task.work
streams are ended so that their workers open them again on the rebuilt Core.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import msgspec

from baaaht.bus.background import Stopping
from baaaht.bus.errors import BusError, unavailable
from baaaht.bus.service import CallContext, Deferred, Publisher
from baaaht.schemas.config import SchedulerConfig
from baaaht.schemas.errors import ErrorCode
from baaaht.schemas.tasks import TERMINAL, TaskInfo
from baaaht.services.scheduler.core import Core, Effects, Now, lease_batches
from baaaht.services.scheduler.store import Batch, SchedulerStore, schedule_row, task_row

log = logging.getLogger("baaaht.scheduler")

MAX_BATCH = 512  # commands in one transaction: bounds the wait of the first for its commit
IDLE_WAIT = 3600.0  # seconds the thread sleeps with no timer due (a command wakes it at once)
# Applications of a told command whose turns failed to commit: again after a failed commit, but not
# forever (a commit failing every time, disk full, made a told change and a reload a hot loop).
TOLD_TRIES = 3
RELOAD_PAUSE = 0.5  # seconds between two rebuilds of the Core after failed commits, at least
MIN_WAIT = 0.01  # seconds a caller is given even when its deadline is nearly gone


class Command:
    __slots__ = ("apply", "told", "_pending", "result", "error", "deferred")

    def __init__(self, apply: Callable[[Core, Now], Any], deferred: Deferred | None = None, told: int = 0):
        self.apply = apply
        self.told = told  # by `tell` (nobody waits for it to refuse it): the applications it has left
        # Held until the command is done: a bare lock is the cheapest thing a thread can wait on.
        self._pending = threading.Lock()
        self._pending.acquire()
        self.result: Any = None
        self.error: BusError | None = None
        self.deferred = deferred  # settled when done: the call is answered from the thread that did it

    def done(self) -> None:
        self._pending.release()
        if self.deferred is not None:
            self.deferred.settle(self.result, self.error)

    def wait(self, timeout: float | None) -> bool:
        return self._pending.acquire(timeout=-1 if timeout is None else timeout)


_STOP = Command(lambda core, now: None)
_RELOAD = Command(lambda core, now: None)  # from the writer: a commit failed, rebuild the Core


@dataclass(slots=True, eq=False)  # the writer's stop is told apart by identity
class Turn:
    """What one engine turn hands the writer: its commands (answered after the commit), its writes
    (encoded on the engine's thread: the rows as the turn left them), its events and pushes."""

    seq: int
    generation: int
    commands: list[Command]
    writes: list
    events: list
    pushes: list


_WRITER_STOP = Turn(-1, -1, [], [], [], [])


def snapshot(result: Any) -> Any:
    """A copy the caller's thread may encode while the engine changes the original."""
    if isinstance(result, msgspec.Struct):
        return msgspec.msgpack.decode(msgspec.msgpack.encode(result), type=type(result))
    return result


class Engine:
    def __init__(
        self,
        store: SchedulerStore,
        config: SchedulerConfig,
        events: Publisher,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        core_factory: Callable[..., Core] = Core,
    ):
        self.store = store
        self.config = config
        self.events = events
        self.clock = clock
        self.monotonic = monotonic
        self.core_factory = core_factory
        self.core: Core | None = None
        self._inbox: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._turns: queue.SimpleQueue[Turn] = queue.SimpleQueue()  # to the writer thread
        # Bumped by each rebuild of the Core: the writer fails the turns of a generation whose commit failed.
        self._generation = 0
        self._failed_generation = -1  # the writer thread's
        # Tasks finished in turns the writer may not have committed yet, by id: (turn, task). The store
        # still has them unfinished; the Core, which no longer holds them, asks for them here first.
        self._unwritten: dict[str, tuple[int, TaskInfo]] = {}
        self._turn_seq = 0
        self._last_reload = -RELOAD_PAUSE  # time.monotonic() of the last rebuild after a failed commit
        self._written_through = 0  # the last turn committed (set by the writer)

    def now(self) -> Now:
        return Now(self.clock(), self.monotonic())

    def load(self) -> None:
        """Rebuild the Core from the store (at start, and after a failed commit)."""
        self._unwritten.clear()  # what the store holds is all there is
        core = self.core_factory(self.config, self._task)
        now = self.now()
        core.load(
            self.store.live_tasks(),
            self.store.keys_since(now.wall - float(self.config.key_retention)),
            self.store.schedules(),
            now,
        )
        if self.core is not None:  # a reload: the task.wait streams still wait
            core.waiters = self.core.waiters
            # An open task.work stream is no row: ended, so that its worker opens it again at once and
            # says which leases it holds (else it waits, idle, until the stream's deadline).
            for worker in self.core.workers.values():
                if worker.push is not None:
                    worker.push(None)
        self.core = core

    def _task(self, task_id: str) -> TaskInfo | None:
        """A task the Core no longer holds: as the engine finished it, or as the store has it."""
        unwritten = self._unwritten.get(task_id)
        return unwritten[1] if unwritten is not None else self.store.get(task_id)

    # -- callers' side (RPC threads) --------------------------------------------------------------

    def call(self, apply: Callable[[Core, Now], Any], ctx: CallContext | None = None) -> Any:
        """Apply `apply(core, now)` on the engine's thread; its result once that change is durable."""
        command = Command(apply)
        self._inbox.put(command)
        wait = max(MIN_WAIT, ctx.remaining()) if ctx is not None else None
        if not command.wait(wait):
            raise BusError(ErrorCode.TIMEOUT, "the scheduler did not answer within the call's deadline")
        if command.error is not None:
            raise command.error
        return command.result

    def defer(self, apply: Callable[[Core, Now], Any]) -> Deferred:
        """As `call`, but the caller's thread does not wait: the runner answers the call once the change
        is durable, from the writer's thread (an RPC thread and a thread switch fewer per call)."""
        deferred = Deferred()
        self._inbox.put(Command(apply, deferred))
        return deferred

    def tell(self, apply: Callable[[Core, Now], Any]) -> None:
        """Apply `apply` on the engine's thread without waiting for it."""
        self._inbox.put(Command(apply, told=TOLD_TRIES))

    def close(self) -> None:
        """Stop `run` (Stopping closes the engine this way)."""
        self._inbox.put(_STOP)

    # -- the engine's thread ----------------------------------------------------------------------

    def run(self, stopping: Stopping) -> None:
        writer = threading.Thread(target=self._write_turns, name="scheduler-writer", daemon=True)
        writer.start()
        try:
            with stopping.closing(self):
                while not stopping.is_set():
                    commands = self._next_commands()
                    if _STOP in commands:
                        for command in commands:
                            if command is not _STOP and command is not _RELOAD:
                                command.error = unavailable("the scheduler is stopping")
                                command.done()
                        return
                    if _RELOAD in commands:
                        self._reload(stopping)
                        commands = [command for command in commands if command is not _RELOAD]
                    self.turn(commands)  # with none: the timers that are due
        finally:
            self._turns.put(_WRITER_STOP)  # the turns handed over are still committed and answered
            writer.join()

    def _reload(self, stopping: Stopping) -> None:
        """A commit failed: the Core is rebuilt from the store (the commands not applied yet are applied
        to the new one; those of turns made on the old one, ahead of the store, are refused by the writer).
        Not sooner than RELOAD_PAUSE after the last rebuild: with a commit failing every time (disk
        full), a change the rebuilt Core makes at once (a schedule's run that is due) failed again, round
        and round."""
        log.warning("a scheduler commit failed: reloading from the store")
        stopping.wait(self._last_reload + RELOAD_PAUSE - time.monotonic())
        self.load()
        self._last_reload = time.monotonic()
        self._generation += 1

    def _next_commands(self) -> list[Command]:
        due = self.core.next_timer()
        wait = IDLE_WAIT if due is None else max(0.0, due - self.monotonic())
        commands = []
        try:
            commands.append(self._inbox.get(timeout=wait) if wait > 0 else self._inbox.get_nowait())
        except queue.Empty:
            return commands
        while len(commands) < MAX_BATCH:
            try:
                commands.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        return commands

    def turn(self, commands: list[Command]) -> None:
        """Apply the commands, fire due timers, dispatch; push the leases; hand the rest to the writer."""
        core = self.core
        now = self.now()
        for command in commands:
            try:
                command.result = snapshot(command.apply(core, now))
            except BusError as exc:  # refused: the Core changes nothing before it refuses
                command.error = exc
            except Exception as exc:
                log.exception("scheduler command failed")
                command.error = BusError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        core.fire_timers(now)
        core.dispatch(now)
        effects = core.take_effects()
        for push, batch in lease_batches(effects.leases):
            push(batch)
        self._turn_seq += 1
        self._remember_finished(effects, self._turn_seq)
        self._turns.put(
            Turn(
                self._turn_seq,
                self._generation,
                commands,
                self._writes(core, effects),
                effects.events,
                effects.pushes,
            )
        )

    def _remember_finished(self, effects: Effects, seq: int) -> None:
        """Keep this turn's finished tasks until their commit; forget those committed since."""
        unwritten, written = self._unwritten, self._written_through
        while unwritten:
            oldest = next(iter(unwritten))
            if unwritten[oldest][0] > written:
                break
            del unwritten[oldest]
        for task in effects.tasks.values():
            if task.state in TERMINAL:
                unwritten.pop(task.id, None)  # to the end: the dict stays in turn order
                unwritten[task.id] = (seq, task)

    def _writes(self, core: Core, effects: Effects) -> list[tuple]:
        """The turn's changes to the store, encoded now (the Core's objects change in later turns): each
        a Batch method and its arguments."""
        writes: list[tuple] = [
            (Batch.put_row, task_row(task, *core.lease_of(task.id))) for task in effects.tasks.values()
        ]
        for key in effects.keys:
            writes.append((Batch.put_key, *key))
        if effects.keys_expired_before:
            writes.append((Batch.drop_keys_before, effects.keys_expired_before))
        if effects.finished_before:
            writes.append((Batch.drop_finished_before, effects.finished_before))
        for schedule in effects.schedules.values():
            writes.append((Batch.put_schedule_row, schedule_row(schedule)))
        for schedule_id in effects.removed_schedules:
            writes.append((Batch.remove_schedule, schedule_id))
        return writes

    # -- the writer's thread ----------------------------------------------------------------------

    def _write_turns(self) -> None:
        while True:
            turns = [self._turns.get()]
            while True:
                try:
                    turns.append(self._turns.get_nowait())
                except queue.Empty:
                    break
            stop = turns[-1] is _WRITER_STOP  # nothing is handed over after it
            self._commit([turn for turn in turns if turn is not _WRITER_STOP])
            if stop:
                return

    def _commit(self, turns: list[Turn]) -> None:
        """Write the turns in one transaction; then answer, publish and push, in their order."""
        doomed = [turn for turn in turns if turn.generation <= self._failed_generation]
        turns = [turn for turn in turns if turn.generation > self._failed_generation]
        for turn in doomed:  # made on a Core that was ahead of the store
            self._refuse(turn, "the scheduler could not commit an earlier change: it reloads from its store")
        writes = [write for turn in turns for write in turn.writes]
        try:
            if writes:
                with self.store.batch() as batch:
                    for method, *args in writes:
                        method(batch, *args)
        except Exception as exc:
            log.exception("scheduler commit failed")
            self._failed_generation = max(turn.generation for turn in turns)
            self._inbox.put(_RELOAD)  # before the told commands `_refuse` queues again
            for turn in turns:
                self._refuse(turn, f"the scheduler could not commit: {exc}")
            return
        if turns:
            self._written_through = turns[-1].seq
        for turn in turns:
            for command in turn.commands:
                command.done()
        for turn in turns:
            for event in turn.events:
                try:
                    self.events.publish(event)
                except Exception:
                    log.exception("publishing a task event failed", extra={"event": type(event).__name__})
            for push, assignment in turn.pushes:
                push(assignment)

    def _refuse(self, turn: Turn, message: str) -> None:
        """The turn's callers are answered UNAVAILABLE; what was told (a session closed, a stream ended)
        has no caller to try again, so it is applied again to the Core rebuilt after the reload (TOLD_TRIES
        times in all; then it goes, refused like the rest)."""
        for command in turn.commands:
            if command.told > 1:
                command.told -= 1
                self._inbox.put(command)
                continue
            command.error = unavailable(message)
            command.done()
