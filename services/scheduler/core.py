"""The scheduler's state machine, without I/O or threads: every method takes `now` (wall and monotonic).

It holds the tasks not finished yet (queued, leased, running), the workers and their leases, the
schedules and one timer heap (not-before times, retry backoffs, lease expiries, start-to-close and
schedule-to-start deadlines, cancel graces, schedule runs, rate limits). What a change does outside
is collected in `Effects` (rows to write, events to publish, assignments to push to workers), which
the engine commits, then publishes and pushes, in that order; a change that is refused (BusError) has
changed nothing. Durable times are wall-clock (they survive restarts); leases and heartbeats are
measured on the monotonic clock.

Dispatch: a worker with a free slot gets the best ready task of its queues that it may take (its
session's only, for a worker agent) and that no limit holds back: highest priority first, then the
oldest. A lease that is not heartbeated in time ends its attempt, as does a start-to-close timeout;
the attempt is then retried per the task's retry policy. At least once; a completion is recorded once,
only for the lease that is current.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import msgspec

from baaaht.bus.errors import BusError, exhausted, invalid, not_found, precondition
from baaaht.schemas.base import Event
from baaaht.schemas.config import SchedulerConfig
from baaaht.schemas.tasks import (
    HEARTBEAT_TIMEOUT,
    LEASE_BATCH_BYTES,
    MAX_ERROR_TEXT,
    SCHEDULE_TO_START_TIMEOUT,
    START_TO_CLOSE_TIMEOUT,
    WORKER_LOST,
    ScheduleInfo,
    ScheduleSpec,
    TaskAssignment,
    TaskAttempt,
    TaskCancelled,
    TaskComplete,
    TaskCompleteResult,
    TaskDead,
    TaskFailed,
    TaskFinished,
    TaskInfo,
    TaskProgress,
    TaskProgressed,
    TaskProgressReport,
    TaskQueued,
    TaskRefused,
    TaskRetrying,
    TaskScheduleAdd,
    TaskStarted,
    TaskState,
    TaskSubmit,
    TaskSucceeded,
    TaskWork,
    WorkerInfo,
)
from baaaht.services.scheduler import retry, schedules
from baaaht.services.scheduler.ids import RandomIds
from baaaht.services.scheduler.limits import Limits

QUEUED, LEASED, RUNNING = TaskState.QUEUED, TaskState.LEASED, TaskState.RUNNING
SESSION_CLOSED = "session closed"
CANCEL_GRACE_EXPIRED = "CancelGraceExpired"

# Timer kinds
READY, START_DEADLINE, LEASE, CLOSE, GRACE, SCHEDULE, RATE = range(7)

_msgpack = msgspec.msgpack.Decoder()
_finished = msgspec.msgpack.Decoder(TaskFinished)
_encode = msgspec.msgpack.Encoder().encode
Push = Callable[[Any], None]  # puts an item into a stream's outbox (a worker's task.work, a task.wait)
Charge = Callable[[int], None]  # counts the attempts of tasks a submit creates against a quota; may raise


@dataclass(frozen=True)
class Now:
    wall: float
    mono: float

    def mono_of(self, wall: float) -> float:
        return self.mono + (wall - self.wall)


@dataclass
class Lease:
    lease_id: str
    task_id: str
    worker_key: str
    timeout: float  # seconds without a heartbeat before it expires
    expires: float  # monotonic
    progress_seq: int = 0  # the last chunk of streamed output received


@dataclass
class Worker:
    key: str
    worker_id: str
    session_id: str  # "" takes any session's tasks (a host worker)
    queues: tuple[str, ...]
    slots: int
    push: Push | None  # None: its stream is closed; push(None) ends it
    stream: object = None
    leases: set[str] = field(default_factory=set)  # task ids
    last_seen: float = 0.0  # wall

    @property
    def free(self) -> int:
        return self.slots - len(self.leases) if self.push is not None else 0


@dataclass
class Effects:
    """What one engine turn writes, publishes and pushes."""

    tasks: dict[str, TaskInfo] = field(default_factory=dict)
    keys: list[tuple[str, str, str, float]] = field(default_factory=list)
    schedules: dict[str, ScheduleInfo] = field(default_factory=dict)
    removed_schedules: set[str] = field(default_factory=set)
    keys_expired_before: float = 0.0  # idempotency keys older than this are forgotten
    finished_before: float = 0.0  # tasks that finished before this are forgotten
    events: list[Event] = field(default_factory=list)
    # (a stream's outbox, what to send; None ends a worker's stream): after the commit
    pushes: list[tuple[Push, Any]] = field(default_factory=list)
    leases: list[tuple[Push, TaskAssignment]] = field(default_factory=list)  # new leases: before it


def lease_batches(leases: list[tuple[Push, TaskAssignment]]) -> Iterator[tuple[Push, TaskAssignment]]:
    """A turn's new leases as the partials that carry them: those of one worker in one (the first, the
    others in its `more`, in their order), one message and one stream hand-off instead of one each;
    a batch holds at most LEASE_BATCH_BYTES of payloads (a larger lease goes alone)."""
    by_worker: dict[Push, list[list[TaskAssignment]]] = {}
    filled: dict[Push, int] = {}  # payload bytes in each worker's last batch
    for push, lease in leases:
        batches = by_worker.setdefault(push, [[]])
        batch, size = batches[-1], filled.get(push, 0)
        if batch and size + len(lease.payload) > LEASE_BATCH_BYTES:
            batch, size = [], 0
            batches.append(batch)
        batch.append(lease)
        filled[push] = size + len(lease.payload)
    for push, batches in by_worker.items():
        for first, *rest in batches:
            yield push, msgspec.structs.replace(first, more=rest) if rest else first


def finished(task: TaskInfo) -> TaskFinished:
    """A finished task as task.wait answers it: a copy, since the waiter's thread encodes it."""
    return _finished.decode(_encode(task))


@contextlib.contextmanager
def named_item(n: int) -> Iterator[None]:
    """A refusal of the n-th task of a batch submit (0: the call's own) says which one it was."""
    try:
        yield
    except BusError as exc:
        if n == 0:
            raise
        raise BusError(exc.code, f"more[{n - 1}]: {exc.message}", {**exc.details, "item": n - 1}) from None


def visible(task: TaskInfo, scope: str | None) -> bool:
    """A scope is None (the host: every task) or a session id (that session's tasks only)."""
    return scope is None or task.session_id == scope


class Core:
    def __init__(
        self,
        config: SchedulerConfig,
        lookup: Callable[[str], TaskInfo | None],
        *,
        uniform: Callable[[float, float], float] = random.uniform,
        new_id: Callable[[], str] | None = None,
    ):
        self.config = config
        # Plain numbers: Duration and Size are config types, not wire types.
        self.lease_timeout = float(config.lease_timeout)
        self.cancel_grace = float(config.cancel_grace)
        self.key_retention = float(config.key_retention)
        self.task_retention = float(config.task_retention)
        self.max_payload = int(config.max_payload)
        self.max_result = int(config.max_result)
        self.session_max_unfinished = config.session_max_unfinished
        self._stored = lookup  # a finished task, from the store (what is committed)
        self.uniform = uniform
        self.new_id = new_id or RandomIds()
        self.limits = Limits(
            config.queue_max_running, config.queue_rate, config.session_max_running, config.session_rate
        )
        self.tasks: dict[str, TaskInfo] = {}  # not finished
        self.unfinished: Counter[str] = Counter()  # session id -> how many of self.tasks are its
        self.leases: dict[str, Lease] = {}  # by task id
        self.workers: dict[str, Worker] = {}
        self.schedules: dict[str, ScheduleInfo] = {}
        self.keys: dict[tuple[str, str], tuple[str, float]] = {}  # (session, key) -> (task id, created_at)
        self.waiters: dict[str, list[Push]] = {}  # task id -> the outboxes of its task.wait streams
        self._ready: dict[
            str, dict[str, list]
        ] = {}  # queue -> session -> heap of (-priority, created, n, id)
        self._ready_ids: set[str] = set()
        self._timers: list[tuple[float, int, int, str, str]] = []  # (due, n, kind, id, lease or "")
        self._order = itertools.count()
        self._rate_wake: float | None = None
        self.up_since = 0.0  # wall time of the load: schedule runs due before it were missed
        self.effects = Effects()

    def take_effects(self) -> Effects:
        effects, self.effects = self.effects, Effects()
        return effects

    # -- loading what was stored ------------------------------------------------------------------

    def load(
        self,
        tasks: list[tuple[TaskInfo, str, str]],
        keys: list[tuple[str, str, str, float]],
        stored_schedules: list[ScheduleInfo],
        now: Now,
    ) -> None:
        """(task, lease id, worker key) of every unfinished task: a leased or running one keeps its
        lease for one heartbeat timeout, for its worker to come back and heartbeat it."""
        self.up_since = now.wall
        for session_id, key, task_id, created_at in keys:
            self.keys[(session_id, key)] = (task_id, created_at)
        for task, lease_id, worker_key in tasks:
            self.tasks[task.id] = task
            self.unfinished[task.session_id] += 1
            if task.state is QUEUED:
                self._enqueue(task, now)
                if not task.attempts:  # its schedule_to_start deadline still runs
                    self._arm_start_deadline(task, task.created_at, now)
                continue
            worker = self.workers.get(worker_key)
            if worker is None:
                session_scope, _, worker_id = worker_key.partition("/")
                worker = self.workers[worker_key] = Worker(worker_key, worker_id, session_scope, (), 0, None)
            self._lease(task, worker, lease_id, now)
            if task.cancel_requested:
                self._timer(now.mono + self.cancel_grace, GRACE, task.id, lease_id)
        for schedule in stored_schedules:
            self.schedules[schedule.id] = schedule
            if not schedule.paused:
                self._arm(schedule, now)

    def lease_of(self, task_id: str) -> tuple[str, str]:
        """(lease id, worker key) of a task, for the store."""
        lease = self.leases.get(task_id)
        return (lease.lease_id, lease.worker_key) if lease else ("", "")

    # -- timers -----------------------------------------------------------------------------------

    def _timer(self, due: float, kind: int, ident: str, lease_id: str = "") -> None:
        heapq.heappush(self._timers, (due, next(self._order), kind, ident, lease_id))

    def next_timer(self) -> float | None:
        """The monotonic time of the earliest timer (None: none)."""
        return self._timers[0][0] if self._timers else None

    def fire_timers(self, now: Now) -> None:
        while self._timers and self._timers[0][0] <= now.mono:
            _due, _n, kind, ident, lease_id = heapq.heappop(self._timers)
            if kind == READY:
                task = self.tasks.get(ident)
                if task is not None and task.state is QUEUED:
                    self._enqueue(task, now)  # made ready, or armed again if the clocks put it early
            elif kind == START_DEADLINE:
                self._start_deadline(ident, now)
            elif kind == LEASE:
                self._lease_timer(ident, lease_id, now)
            elif kind == CLOSE:
                if self._current(ident, lease_id):
                    self._attempt_ended(
                        ident, START_TO_CLOSE_TIMEOUT, "the attempt ran past start_to_close", now
                    )
            elif kind == GRACE:
                if self._current(ident, lease_id):
                    self._release(self.tasks[ident], now)
                    self._finish(self.tasks[ident], TaskState.CANCELLED, now, CANCEL_GRACE_EXPIRED)
            elif kind == SCHEDULE:
                self._schedule_due(ident, lease_id, now)
            # RATE: nothing but a wake-up for dispatch

    def _current(self, task_id: str, lease_id: str) -> bool:
        lease = self.leases.get(task_id)
        return lease is not None and lease.lease_id == lease_id

    def _lease_timer(self, task_id: str, lease_id: str, now: Now) -> None:
        lease = self.leases.get(task_id)
        if lease is None or lease.lease_id != lease_id:
            return
        if lease.expires > now.mono:  # heartbeated since: look again when it would expire
            self._timer(lease.expires, LEASE, task_id, lease_id)
            return
        self._attempt_ended(task_id, HEARTBEAT_TIMEOUT, f"no heartbeat for {lease.timeout:g}s", now)

    def _start_deadline(self, task_id: str, now: Now) -> None:
        task = self.tasks.get(task_id)
        if task is None or task.state is not QUEUED:
            return
        if task.cancel_requested or task.attempts:  # it started once: the deadline was met
            return
        self._set_error(
            task, SCHEDULE_TO_START_TIMEOUT, f"not started within {task.timeouts.schedule_to_start:g}s"
        )
        self._finish(task, TaskState.FAILED, now)

    # -- tasks ------------------------------------------------------------------------------------

    def submit(
        self, req: TaskSubmit, session_id: str, now: Now, charge: Charge | None = None
    ) -> tuple[TaskInfo, bool]:
        """`charge`, if any, is told the attempts of a task about to be created (none for a duplicate),
        once nothing else refuses it: it may refuse too (raise), with nothing changed."""
        self._check_payload(req.payload, "payload")
        return self._accept(req, session_id, now, charge)

    def submit_batch(
        self, items: list[TaskSubmit], session_ids: list[str], now: Now, charge: Charge | None = None
    ) -> list[tuple[TaskInfo, bool]]:
        """The tasks of one task.submit (its own, then those of its `more`): every one accepted, or none
        when one is refused (checked before anything changes; the error names it: `named_item`).
        `charge`, as for `submit`, is told the attempts of all the tasks the batch creates."""
        for n, item in enumerate(items):
            with named_item(n):
                self._check_payload(item.payload, "payload")
        new: Counter[str] = Counter()
        new_attempts = 0
        keys = set()
        for item, session_id in zip(items, session_ids, strict=True):
            if self._known(item, session_id, now) is None and (session_id, item.key) not in keys:
                new[session_id] += 1
                new_attempts += item.retry.maximum_attempts
                if item.key:  # a key twice in one call makes one task
                    keys.add((session_id, item.key))
        for session_id, count in new.items():
            self._check_room(session_id, count)
        if charge is not None:
            charge(new_attempts)
        return [
            self._accept(item, session_id, now) for item, session_id in zip(items, session_ids, strict=True)
        ]

    def _known(self, req: TaskSubmit, session_id: str, now: Now) -> TaskInfo | None:
        """The task a submit's idempotency key still answers with, if any."""
        if req.key:
            found = self.keys.get((session_id, req.key))
            if found is not None and found[1] >= now.wall - self.key_retention:
                return self.tasks.get(found[0]) or self.lookup(found[0])
        return None

    def _check_room(self, session_id: str, count: int = 1) -> None:
        """A session holds at most session_max_unfinished tasks not finished: a hostile assistant
        submitting without end fills the queue (and the disk), not the scheduler's memory for ever."""
        cap = self.session_max_unfinished
        if session_id and cap and self.unfinished[session_id] + count > cap:
            raise exhausted(
                f"session {session_id} has {self.unfinished[session_id]} tasks not finished; "
                f"{count} more would pass scheduler.session_max_unfinished ({cap})",
                session_id=session_id,
                limit=cap,
            )

    def _accept(
        self, req: TaskSubmit, session_id: str, now: Now, charge: Charge | None = None
    ) -> tuple[TaskInfo, bool]:
        known = self._known(req, session_id, now)
        if known is not None:
            return known, True
        self._check_room(session_id)
        if charge is not None:
            charge(req.retry.maximum_attempts)
        not_before = max(req.not_before, now.wall + req.delay) if (req.delay or req.not_before) else 0.0
        task = self._new_task(
            req, session_id, now, key=req.key, not_before=not_before if not_before > now.wall else 0.0
        )
        if req.key:
            self.keys[(session_id, req.key)] = (task.id, now.wall)
            self.effects.keys.append((session_id, req.key, task.id, now.wall))
        self._add(task, now)
        return task, False

    def _new_task(self, source: TaskSubmit | ScheduleInfo, session_id: str, now: Now, **fields) -> TaskInfo:
        """A queued task of what a submit or a schedule says."""
        return TaskInfo(
            id=self.new_id(),
            queue=source.queue,
            task_type=source.task_type,
            payload=source.payload,
            priority=source.priority,
            session_id=session_id,
            state=QUEUED,
            timeouts=source.timeouts,
            retry=source.retry,
            created_at=now.wall,
            updated_at=now.wall,
            **fields,
        )

    def forget_keys(self, now: Now) -> None:
        """Idempotency keys past their retention answer no more."""
        before = now.wall - self.key_retention
        self.keys = {k: v for k, v in self.keys.items() if v[1] >= before}
        self.effects.keys_expired_before = before

    def prune(self, now: Now) -> None:
        """Finished tasks past their retention are forgotten (none with a retention of 0)."""
        if self.task_retention:
            self.effects.finished_before = now.wall - self.task_retention

    def _add(self, task: TaskInfo, now: Now) -> None:
        self.tasks[task.id] = task
        self.unfinished[task.session_id] += 1
        self._enqueue(task, now)
        self._arm_start_deadline(task, now.wall, now)
        self._save(task)
        self._event(TaskQueued, task, not_before=task.not_before)

    def _arm_start_deadline(self, task: TaskInfo, queued_at: float, now: Now) -> None:
        """The schedule_to_start deadline of a task queued at `queued_at` (counted once it is due)."""
        if task.timeouts.schedule_to_start:
            due = max(task.not_before, queued_at) + task.timeouts.schedule_to_start
            self._timer(now.mono_of(due), START_DEADLINE, task.id)

    def _check_payload(self, payload: bytes, what: str, cap: int | None = None) -> None:
        cap = self.max_payload if cap is None else cap
        if len(payload) > cap:
            raise invalid(f"{what} is {len(payload)} bytes, more than the {cap} allowed", field=what)
        if payload:
            try:
                _msgpack.decode(payload)
            except (msgspec.DecodeError, RecursionError):
                raise invalid(f"{what} is not msgpack", field=what) from None

    def _enqueue(self, task: TaskInfo, now: Now) -> None:
        if task.not_before > now.wall:
            self._timer(now.mono_of(task.not_before), READY, task.id)
        else:
            self._make_ready(task)

    def _make_ready(self, task: TaskInfo) -> None:
        if task.id in self._ready_ids:
            return
        heap = self._ready.setdefault(task.queue, {}).setdefault(task.session_id, [])
        heapq.heappush(heap, (-task.priority, task.created_at, next(self._order), task.id))
        self._ready_ids.add(task.id)

    def task(self, task_id: str, scope: str | None) -> TaskInfo:
        """An unfinished task, or the reason it cannot be acted on."""
        task = self.tasks.get(task_id)
        if task is not None and visible(task, scope):
            return task
        stored = self.lookup(task_id)
        if stored is not None and visible(stored, scope):
            raise precondition(f"task {task_id} is {stored.state.value}", state=stored.state.value)
        raise not_found(f"no task {task_id}", id=task_id)

    def cancel(self, task_id: str, scope: str | None, reason: str, now: Now) -> TaskInfo:
        task = self.task(task_id, scope)
        self._cancel(task, reason or "cancelled on request", now)
        return task

    def _cancel(self, task: TaskInfo, reason: str, now: Now) -> None:
        if task.state is QUEUED:
            self._ready_ids.discard(task.id)  # its heap entry is skipped when it comes up
            self._finish(task, TaskState.CANCELLED, now, reason=reason)
            return
        if task.cancel_requested:
            return
        task.cancel_requested = True
        task.updated_at = now.wall
        self._save(task)
        lease = self.leases[task.id]
        self._push_cancel(task, lease, reason)
        self._timer(now.mono + self.cancel_grace, GRACE, task.id, lease.lease_id)

    def _push_cancel(self, task: TaskInfo, lease: Lease, reason: str) -> None:
        worker = self.workers.get(lease.worker_key)
        if worker is not None and worker.push is not None:
            cancel = TaskAssignment(kind="cancel", task_id=task.id, lease_id=lease.lease_id, reason=reason)
            self.effects.pushes.append((worker.push, cancel))

    def lookup(self, task_id: str) -> TaskInfo | None:
        """A finished task: one this turn finished (not committed yet, so the store still has it running)
        first, else the store's."""
        return self.effects.tasks.get(task_id) or self._stored(task_id)

    def wait_open(self, task_id: str, scope: str | None, push: Push) -> TaskFinished | None:
        """A waiter of a task from now on (None), or the task when it is finished already."""
        task = self.tasks.get(task_id)
        if task is not None and visible(task, scope):
            self.waiters.setdefault(task_id, []).append(push)
            return None
        stored = self.lookup(task_id)
        if stored is None or not visible(stored, scope):
            raise not_found(f"no task {task_id}", id=task_id)
        return finished(stored)

    def wait_closed(self, task_id: str, push: Push) -> None:
        waiting = self.waiters.get(task_id)
        if waiting is not None and push in waiting:
            waiting.remove(push)
            if not waiting:
                del self.waiters[task_id]

    def progress(self, req: TaskProgress, scope: str | None, now: Now) -> None:
        task, lease = self._held(req.task_id, req.lease_id, scope)
        self._seen(lease, now)  # output is a sign of life as good as a heartbeat
        attempt = len(task.attempts)
        for seq, data in enumerate(req.chunks, start=req.seq):
            if seq <= lease.progress_seq:
                continue  # received before: the worker retried a call whose answer it lost
            lease.progress_seq = seq
            self.effects.events.append(
                TaskProgressed(
                    task_id=task.id, session_id=task.session_id, attempt=attempt, seq=seq, data=data
                )
            )
            report = TaskProgressReport(task_id=task.id, attempt=attempt, seq=seq, data=data)
            self.effects.pushes.extend((push, report) for push in self.waiters.get(task.id, ()))

    def requeue(self, task_id: str, scope: str | None, now: Now) -> TaskInfo:
        if task_id in self.tasks and visible(self.tasks[task_id], scope):
            raise precondition(f"task {task_id} is {self.tasks[task_id].state.value}: not finished")
        task = self.lookup(task_id)
        if task is None or not visible(task, scope):
            raise not_found(f"no task {task_id}", id=task_id)
        if task.state is TaskState.SUCCEEDED:
            raise precondition(f"task {task_id} succeeded: there is nothing to run again")
        task.state = QUEUED
        task.attempts_before_requeue = len(task.attempts)
        task.cancel_requested = False
        task.not_before = 0.0
        task.finished_at = 0.0
        task.updated_at = now.wall
        self._add(task, now)
        return task

    def sessions_in_use(self) -> set[str]:
        """The sessions of the unfinished tasks and the schedules."""
        in_use = {t.session_id for t in self.tasks.values()} | {s.session_id for s in self.schedules.values()}
        in_use.discard("")
        return in_use

    def session_closed(self, session_id: str, now: Now) -> None:
        for task in [t for t in self.tasks.values() if t.session_id == session_id]:
            self._cancel(task, SESSION_CLOSED, now)
        for schedule in [s for s in self.schedules.values() if s.session_id == session_id]:
            self.remove_schedule(schedule.id, session_id)
        self.limits.forget_session(session_id)

    # -- workers ----------------------------------------------------------------------------------

    def work_open(
        self,
        req: TaskWork,
        scope: str | None,
        push: Push,
        stream: object,
        now: Now,
    ) -> str:
        """A worker's stream opened (or reopened): its key."""
        session_scope = scope or ""
        key = f"{session_scope}/{req.worker_id}"
        worker = self.workers.get(key)
        if worker is None:
            worker = self.workers[key] = Worker(key, req.worker_id, session_scope, (), 0, None)
        if worker.push is not None:  # its last stream may be dead without anyone knowing (a broker restart)
            self.effects.pushes.append((worker.push, None))
        worker.queues, worker.slots, worker.push, worker.stream = tuple(req.queues), req.slots, push, stream
        worker.last_seen = now.wall
        held = set(req.held)
        for task_id in list(worker.leases):
            lease = self.leases[task_id]
            if lease.lease_id not in held:
                self._attempt_ended(task_id, WORKER_LOST, "the worker came back without it", now)
            elif self.tasks[task_id].cancel_requested:
                self._push_cancel(self.tasks[task_id], lease, "cancel requested")
        return key

    def work_closed(self, key: str, stream: object) -> None:
        worker = self.workers.get(key)
        if worker is None or worker.stream is not stream:
            return  # a newer stream of the same worker took over
        worker.push = None
        if not worker.leases:
            del self.workers[key]

    def _held(self, task_id: str, lease_id: str, scope: str | None) -> tuple[TaskInfo, Lease]:
        lease = self.leases.get(task_id)
        task = self.tasks.get(task_id)
        if lease is None or task is None or lease.lease_id != lease_id or not visible(task, scope):
            raise precondition(f"lease {lease_id} of task {task_id} is not held", id=task_id)
        return task, lease

    def _seen(self, lease: Lease, now: Now) -> None:
        lease.expires = now.mono + lease.timeout
        worker = self.workers.get(lease.worker_key)
        if worker is not None:
            worker.last_seen = now.wall

    def ack(self, task_id: str, lease_id: str, scope: str | None, now: Now) -> None:
        """A lease is the start of its attempt: an ack only keeps it (and starts a task that an older
        version's store has leased)."""
        task, lease = self._held(task_id, lease_id, scope)
        self._seen(lease, now)
        if task.state is LEASED:
            task.state = RUNNING
            task.attempts[-1].started_at = now.wall
            task.updated_at = now.wall
            self._save(task)
            self._event(TaskStarted, task, worker=task.attempts[-1].worker)

    def heartbeat(self, task_id: str, lease_id: str, scope: str | None, now: Now) -> bool:
        task, lease = self._held(task_id, lease_id, scope)
        self._seen(lease, now)
        return task.cancel_requested

    def complete(self, req: TaskComplete, scope: str | None, now: Now) -> None:
        task, _lease = self._held(req.task_id, req.lease_id, scope)
        if req.outcome == "succeeded":
            self._check_payload(req.result, "result", self.max_result)
        self._release(task, now)
        if req.outcome == "succeeded":
            task.result = req.result
            self._finish(task, TaskState.SUCCEEDED, now)
        elif req.outcome == "cancelled" or task.cancel_requested:
            self._finish(task, TaskState.CANCELLED, now, reason=req.error or "cancelled by the worker")
        else:
            self._failed(task, req.error_type or "Error", req.error, req.non_retryable, now)

    def complete_batch(self, req: TaskComplete, scope: str | None, now: Now) -> TaskCompleteResult:
        """The outcomes of one call (its own and those in `more`), each recorded or refused on its own."""
        if any(outcome.more for outcome in req.more):
            raise invalid("an outcome in a task.complete's more has a more of its own", field="more")
        refused = []
        for outcome in (req, *req.more):
            try:
                self.complete(outcome, scope, now)
            except BusError as exc:
                refused.append(
                    TaskRefused(
                        lease_id=outcome.lease_id, code=exc.code, message=exc.message[:MAX_ERROR_TEXT]
                    )
                )
        return TaskCompleteResult(refused=refused)

    def _attempt_ended(self, task_id: str, error_type: str, error: str, now: Now) -> None:
        """The scheduler ends the current attempt (lease expired, ran too long, worker lost it)."""
        task = self.tasks[task_id]
        lease = self.leases[task_id]
        self._push_cancel(task, lease, error)
        self._release(task, now)
        if task.cancel_requested:
            self._finish(task, TaskState.CANCELLED, now, reason=error)
        else:
            self._failed(task, error_type, error, False, now)

    def _release(self, task: TaskInfo, now: Now) -> None:
        lease = self.leases.pop(task.id)
        task.attempts[-1].ended_at = now.wall
        self.limits.ended(task.queue, task.session_id)
        worker = self.workers.get(lease.worker_key)
        if worker is not None:
            worker.leases.discard(task.id)
            if worker.push is None and not worker.leases:
                del self.workers[worker.key]

    def _set_error(self, task: TaskInfo, error_type: str, error: str) -> None:
        task.error_type, task.error = error_type, error
        if task.attempts and task.attempts[-1].ended_at and not task.attempts[-1].error_type:
            task.attempts[-1].error_type, task.attempts[-1].error = error_type, error

    def _failed(self, task: TaskInfo, error_type: str, error: str, non_retryable: bool, now: Now) -> None:
        self._set_error(task, error_type, error)
        attempts = len(task.attempts) - task.attempts_before_requeue
        verdict = retry.after_failure(task.retry, attempts, error_type, non_retryable, self.uniform)
        if verdict.action == "retry":
            task.state = QUEUED
            task.not_before = now.wall + verdict.delay
            task.updated_at = now.wall
            self._enqueue(task, now)
            self._save(task)
            self._event(TaskRetrying, task, error_type=error_type, error=error, retry_at=task.not_before)
        else:
            self._finish(task, TaskState.FAILED if verdict.action == "fail" else TaskState.DEAD, now)

    def _finish(
        self, task: TaskInfo, state: TaskState, now: Now, error_type: str = "", reason: str = ""
    ) -> None:
        task.state = state
        task.finished_at = task.updated_at = now.wall
        if error_type:
            self._set_error(task, error_type, reason or error_type)
        del self.tasks[task.id]
        self.unfinished[task.session_id] -= 1
        if not self.unfinished[task.session_id]:
            del self.unfinished[task.session_id]
        self._save(task)
        waiting = self.waiters.pop(task.id, ())
        if waiting:
            answer = finished(task)
            self.effects.pushes.extend((push, answer) for push in waiting)
        if state is TaskState.SUCCEEDED:
            self._event(TaskSucceeded, task)
        elif state is TaskState.CANCELLED:
            self._event(TaskCancelled, task, reason=reason or task.error)
        elif state is TaskState.FAILED:
            self._event(TaskFailed, task, error_type=task.error_type, error=task.error)
        else:
            self._event(TaskDead, task, error_type=task.error_type, error=task.error)
        self._schedule_task_finished(task, now)

    # -- dispatch ---------------------------------------------------------------------------------

    def dispatch(self, now: Now) -> None:
        """Lease ready tasks to workers with free slots, one per worker per round (spreading the work)."""
        while True:
            leased = False
            for worker in list(self.workers.values()):
                if worker.free <= 0:
                    continue
                task = self._best_for(worker, now)
                if task is not None:
                    self._lease(task, worker, self.new_id(), now, started=True)
                    leased = True
            if not leased:
                return

    def _best_for(self, worker: Worker, now: Now) -> TaskInfo | None:
        best: tuple | None = None
        for queue in worker.queues:
            for session_id, heap in self._ready.get(queue, {}).items():
                if worker.session_id and session_id != worker.session_id:
                    continue
                while heap and heap[0][3] not in self._ready_ids:
                    heapq.heappop(heap)
                if not heap:
                    continue
                if not self.limits.allows(queue, session_id, now.mono):
                    self._wake_for_rate(self.limits.blocked_until(queue, session_id, now.mono), now)
                    continue
                if best is None or heap[0] < best[0]:
                    best = (heap[0], heap)
        if best is None:
            return None
        _key, heap = best
        task_id = heapq.heappop(heap)[3]
        self._ready_ids.discard(task_id)
        return self.tasks[task_id]

    def _wake_for_rate(self, wake: float | None, now: Now) -> None:
        """One pending wake-up for the earliest time a rate limit lets a start through."""
        if wake is None:
            return
        if self._rate_wake is None or self._rate_wake <= now.mono or wake < self._rate_wake:
            self._rate_wake = wake
            self._timer(wake, RATE, "")

    def _lease(self, task: TaskInfo, worker: Worker, lease_id: str, now: Now, started: bool = False) -> None:
        timeout = task.timeouts.heartbeat or self.lease_timeout
        lease = Lease(lease_id, task.id, worker.key, timeout, now.mono + timeout)
        self.leases[task.id] = lease
        worker.leases.add(task.id)
        self.limits.started(task.queue, task.session_id, now.mono)
        self._timer(lease.expires, LEASE, task.id, lease_id)
        if started:  # a new attempt (else one loaded from the store), running from its lease on
            task.state = RUNNING
            task.attempts.append(
                TaskAttempt(
                    number=len(task.attempts) + 1,
                    worker=worker.worker_id,
                    leased_at=now.wall,
                    started_at=now.wall,
                )
            )
            task.updated_at = now.wall
            self._save(task)
            self._event(TaskStarted, task, worker=worker.worker_id)
            assignment = TaskAssignment(
                kind="lease",
                task_id=task.id,
                lease_id=lease_id,
                queue=task.queue,
                task_type=task.task_type,
                payload=task.payload,
                session_id=task.session_id,
                attempt=len(task.attempts),
                heartbeat_timeout=timeout,
                start_to_close=task.timeouts.start_to_close,
            )
            self.effects.leases.append((worker.push, assignment))
        if task.timeouts.start_to_close:
            began = task.attempts[-1].leased_at
            self._timer(now.mono_of(began + task.timeouts.start_to_close), CLOSE, task.id, lease_id)

    def worker_list(self, scope: str | None) -> list[WorkerInfo]:
        return [
            WorkerInfo(
                worker_id=w.worker_id,
                queues=list(w.queues),
                slots=w.slots,
                in_use=len(w.leases),
                connected=w.push is not None,
                session_id=w.session_id,
                last_seen=w.last_seen,
            )
            for w in self.workers.values()
            if scope is None or w.session_id == scope
        ]

    # -- schedules --------------------------------------------------------------------------------

    def add_schedule(self, req: TaskScheduleAdd, session_id: str, now: Now) -> ScheduleInfo:
        schedules.check(req.cron, req.every)
        self._check_payload(req.payload, "payload")
        spec = {name: getattr(req, name) for name in ScheduleSpec.__struct_fields__}
        schedule = ScheduleInfo(
            **{**spec, "session_id": session_id},
            id=self.new_id()[:16],
            catch_up_window=req.catch_up_window,
            created_at=now.wall,
        )
        schedule.next_run_at = schedules.next_after(schedule, now.wall)
        self.schedules[schedule.id] = schedule
        self._save_schedule(schedule, now)
        return schedule

    def schedule(self, schedule_id: str, scope: str | None) -> ScheduleInfo:
        schedule = self.schedules.get(schedule_id)
        if schedule is None or (scope is not None and schedule.session_id != scope):
            raise not_found(f"no schedule {schedule_id}", id=schedule_id)
        return schedule

    def remove_schedule(self, schedule_id: str, scope: str | None) -> None:
        self.schedule(schedule_id, scope)
        del self.schedules[schedule_id]
        self.effects.schedules.pop(schedule_id, None)
        self.effects.removed_schedules.add(schedule_id)

    def pause_schedule(self, schedule_id: str, scope: str | None, paused: bool, now: Now) -> ScheduleInfo:
        schedule = self.schedule(schedule_id, scope)
        if schedule.paused != paused:
            schedule.paused = paused
            if not paused:  # from now on: what was missed while paused is not made up
                schedule.next_run_at = schedules.next_after(schedule, now.wall)
            self._save_schedule(schedule, now)
        return schedule

    def _save_schedule(self, schedule: ScheduleInfo, now: Now) -> None:
        self.effects.schedules[schedule.id] = schedule
        self.effects.removed_schedules.discard(schedule.id)
        if not schedule.paused:
            self._arm(schedule, now)

    def _arm(self, schedule: ScheduleInfo, now: Now) -> None:
        """A timer for the schedule's next run time; one for an earlier run time no longer counts."""
        self._timer(now.mono_of(schedule.next_run_at), SCHEDULE, schedule.id, repr(schedule.next_run_at))

    def _schedule_due(self, schedule_id: str, armed_for: str, now: Now) -> None:
        schedule = self.schedules.get(schedule_id)
        if schedule is None or schedule.paused or armed_for != repr(schedule.next_run_at):
            return  # removed, paused, or the timer of a run time since replaced
        if schedule.next_run_at > now.wall:  # the clocks put it early: the same run, a little later
            self._timer(now.mono_of(schedule.next_run_at), SCHEDULE, schedule_id, armed_for)
            return
        fire = schedules.fire(schedule, now.wall, self.up_since)
        schedule.next_run_at = fire.next_run_at
        if fire.run:
            schedule.last_run_at = fire.run_time
            running = schedule.last_task_id in self.tasks
            if not running or schedule.overlap == "allow":
                self._schedule_run(schedule, now)
            elif schedule.overlap == "buffer_one":
                schedule.buffered = True
        self._save_schedule(schedule, now)

    def _schedule_run(self, schedule: ScheduleInfo, now: Now) -> None:
        task = self._new_task(schedule, schedule.session_id, now, schedule_id=schedule.id)
        schedule.last_task_id = task.id
        schedule.runs += 1
        self._add(task, now)

    def _schedule_task_finished(self, task: TaskInfo, now: Now) -> None:
        schedule = self.schedules.get(task.schedule_id) if task.schedule_id else None
        if schedule is not None and schedule.buffered and schedule.last_task_id == task.id:
            schedule.buffered = False
            self._schedule_run(schedule, now)
            self._save_schedule(schedule, now)

    # -- effects ----------------------------------------------------------------------------------

    def _save(self, task: TaskInfo) -> None:
        self.effects.tasks[task.id] = task

    def _event(self, event_type: type, task: TaskInfo, **fields) -> None:
        self.effects.events.append(
            event_type(
                task_id=task.id,
                queue=task.queue,
                task_type=task.task_type,
                session_id=task.session_id,
                attempt=len(task.attempts),
                state=task.state,
                **fields,
            )
        )
