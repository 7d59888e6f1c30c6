"""The scheduler's one thread of change: commands from RPC threads, timers, dispatch, commit, fan-out.

Every change goes through `call(apply)`: the command is queued to the engine's thread, which takes every
command waiting at once (up to MAX_BATCH), applies them to the Core in order, fires the timers that are
due, dispatches, and writes all of it in one transaction: one commit, one fsync for the lot (group
commit). Only then are the callers answered, the events published and cancels and finished tasks
pushed, so nothing is acknowledged or announced before it is durable. New leases alone go out before
the commit, so that the worker starts while the fsync runs (an idle worker gets a task in less time
than a commit takes): a lease whose commit then fails, or whose scheduler dies first, is unknown to
the store, and its worker's reports are refused (FAILED_PRECONDITION); the task runs again from
what the store holds. That is the at-least-once execution the scheduler promises anyway; completions
are still recorded once, and only after the lease's own commit (the next turn's). It waits for the
next command or the next timer, whichever comes first: there is no polling interval.

A commit that fails leaves the Core ahead of the store: it is rebuilt from the store, and every command
of that turn is answered UNAVAILABLE.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Callable

import msgspec

from baaaht.bus.background import Stopping
from baaaht.bus.errors import BusError, unavailable
from baaaht.bus.service import CallContext, Publisher
from baaaht.schemas.config import SchedulerConfig
from baaaht.schemas.errors import ErrorCode
from baaaht.services.scheduler.core import Core, Effects, Now
from baaaht.services.scheduler.store import SchedulerStore

log = logging.getLogger("baaaht.scheduler")

MAX_BATCH = 512  # commands in one transaction: bounds the wait of the first for its commit
IDLE_WAIT = 3600.0  # seconds the thread sleeps with no timer due (a command wakes it at once)
MIN_WAIT = 0.01  # seconds a caller is given even when its deadline is nearly gone


class Command:
    __slots__ = ("apply", "_pending", "result", "error")

    def __init__(self, apply: Callable[[Core, Now], Any]):
        self.apply = apply
        # Held until the command is done: a bare lock is the cheapest thing a thread can wait on.
        self._pending = threading.Lock()
        self._pending.acquire()
        self.result: Any = None
        self.error: BusError | None = None

    def done(self) -> None:
        self._pending.release()

    def wait(self, timeout: float | None) -> bool:
        return self._pending.acquire(timeout=-1 if timeout is None else timeout)


_STOP = Command(lambda core, now: None)


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

    def now(self) -> Now:
        return Now(self.clock(), self.monotonic())

    def load(self) -> None:
        """Rebuild the Core from the store (at start, and after a failed commit)."""
        core = self.core_factory(self.config, self.store.get)
        now = self.now()
        core.load(
            self.store.live_tasks(),
            self.store.keys_since(now.wall - float(self.config.key_retention)),
            self.store.schedules(),
            now,
        )
        if self.core is not None:  # a reload: the task.wait streams still wait
            core.waiters = self.core.waiters
        self.core = core

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

    def tell(self, apply: Callable[[Core, Now], Any]) -> None:
        """Apply `apply` on the engine's thread without waiting for it."""
        self._inbox.put(Command(apply))

    def close(self) -> None:
        """Stop `run` (Stopping closes the engine this way)."""
        self._inbox.put(_STOP)

    # -- the engine's thread ----------------------------------------------------------------------

    def run(self, stopping: Stopping) -> None:
        with stopping.closing(self):
            while not stopping.is_set():
                commands = self._next_commands()
                if _STOP in commands:
                    for command in commands:
                        if command is not _STOP:
                            command.error = unavailable("the scheduler is stopping")
                            command.done()
                    return
                self.turn(commands)

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
        """Apply the commands, fire due timers, dispatch; push the leases; commit; then answer, publish
        and push the rest."""
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
        for push, lease in effects.leases:
            push(lease)
        try:
            self._write(core, effects)
        except Exception as exc:
            log.exception("scheduler commit failed: reloading from the store")
            for command in commands:
                command.error = unavailable(f"the scheduler could not commit: {exc}")
                command.done()
            self.load()
            return
        for command in commands:
            command.done()
        for event in effects.events:
            try:
                self.events.publish(event)
            except Exception:
                log.exception("publishing a task event failed", extra={"event": type(event).__name__})
        for push, assignment in effects.pushes:
            push(assignment)

    def _write(self, core: Core, effects: Effects) -> None:
        if not (effects.tasks or effects.keys or effects.schedules or effects.removed_schedules):
            if not (effects.keys_expired_before or effects.finished_before):
                return
        with self.store.batch() as batch:
            for task in effects.tasks.values():
                batch.put_task(task, *core.lease_of(task.id))
            for key in effects.keys:
                batch.put_key(*key)
            if effects.keys_expired_before:
                batch.drop_keys_before(effects.keys_expired_before)
            if effects.finished_before:
                batch.drop_finished_before(effects.finished_before)
            for schedule in effects.schedules.values():
                batch.put_schedule(schedule)
            for schedule_id in effects.removed_schedules:
                batch.remove_schedule(schedule_id)
