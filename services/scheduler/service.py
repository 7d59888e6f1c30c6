"""The task scheduler service (`task.*`): its RPCs are thin; every change is one command to the Engine.

Reads (task.get, task.list, task.schedule.list) go to the store's reader and see what is committed;
every change is answered after its commit. Workers take work on a stream (`task.work`): the engine
pushes leases and cancels into the stream's outbox and the stream hands them to the worker at once.
"""

from __future__ import annotations

import logging
import queue
import time
from typing import Any, Iterator

from baaaht.bus.background import Stopping, background
from baaaht.bus.callers import is_host
from baaaht.bus.client import BusClient
from baaaht.bus.errors import BusError, exhausted, invalid, not_found
from baaaht.bus.peers import Peer
from baaaht.bus.service import CallContext, Deferred, Publisher, Service, on_event, rpc
from baaaht.common.session_quotas import SessionQuotas
from baaaht.schemas.base import Empty
from baaaht.schemas.config import Config
from baaaht.schemas.errors import ErrorCode
from baaaht.schemas.sessions import SessionClosed
from baaaht.schemas.tasks import (
    ScheduleInfo,
    ScheduleListResult,
    TaskAck,
    TaskAssignment,
    TaskCancel,
    TaskComplete,
    TaskCompleteResult,
    TaskFinished,
    TaskGet,
    TaskHeartbeat,
    TaskHeartbeatResult,
    TaskInfo,
    TaskList,
    TaskPage,
    TaskProgress,
    TaskProgressReport,
    TaskRequeue,
    TaskScheduleAdd,
    TaskScheduleList,
    TaskSchedulePause,
    TaskScheduleRemove,
    TaskScheduleResume,
    TaskSubmit,
    TaskSubmitResult,
    TaskWait,
    TaskWork,
    TaskWorkers,
    TaskWorkersResult,
)
from baaaht.services.scheduler.core import Charge, named_item, visible
from baaaht.services.scheduler.engine import Engine
from baaaht.services.scheduler.scope import check_submit_queue, scope_of, session_for
from baaaht.services.scheduler.sessions import catch_up, session_peer
from baaaht.services.scheduler.store import SchedulerStore
from baaaht.services.scheduler.streams import StreamSlots

log = logging.getLogger("baaaht.scheduler")

CONCURRENCY = 256  # handler threads: every open task.work or task.wait stream holds one
MAX_STREAMS = CONCURRENCY - 32  # the rest stay free for submits and reports
# Streams one session's agents may hold at once (its assistant's parallel tool waits, its worker's
# task.work): a hostile agent opening waits or worker ids by the hundred must not take every stream and
# leave the other sessions' workers no task.work.
SESSION_STREAMS = 64
# Streams only task.work (WORK_STREAMS), and only task.wait (WAIT_STREAMS), may take once the others
# hold the rest: one of each per session, and host callers' (streams.py): hostile sessions at their
# SESSION_STREAMS each still leave the workers of up to 64 other sessions a task.work, and the assistants
# of up to 32 a task.wait (past those, a session's waits are refused until one ends).
WORK_STREAMS = 64
WAIT_STREAMS = 32
STREAM_CHECK = 0.5  # seconds between looks at whether a stream's caller left (items go out at once)
KEY_SWEEP = 600.0  # seconds between purges of idempotency keys past their retention
QUOTA_SWEEP = 60.0  # seconds between purges of the sessions' task quotas that are full again


class SchedulerService(Service):
    name = "task"
    concurrency = CONCURRENCY

    def __init__(self, store: SchedulerStore, config: Config, *, events: Publisher, sessions: Peer):
        self.store = store
        self.config = config.scheduler
        self.engine = Engine(store, self.config, events)
        self.sessions = sessions
        self._sessions_at_start: set[str] = set()
        self.streams = StreamSlots(MAX_STREAMS, SESSION_STREAMS, {"work": WORK_STREAMS, "wait": WAIT_STREAMS})
        self.quotas = SessionQuotas.for_limits(config.limits)  # what agents may cause, per session

    @classmethod
    def from_config(cls, config: Config, bus: BusClient) -> "SchedulerService":
        store = SchedulerStore.in_data_dir(config.data_dir)
        return cls(store, config, events=bus, sessions=session_peer(bus, float(config.bus.call_timeout)))

    def on_start(self) -> None:
        self.engine.load()
        self._sessions_at_start = self.engine.core.sessions_in_use()

    def on_stop(self) -> None:
        self.store.close()

    @background
    def run_engine(self, stopping: Stopping) -> None:
        self.engine.run(stopping)

    @background
    def catch_up_ended_sessions(self, stopping: Stopping) -> None:
        """The session.closed events missed while the scheduler was down."""

        def end(session_id: str) -> None:
            self.engine.tell(lambda core, now: core.session_closed(session_id, now))

        catch_up(self.sessions, self._sessions_at_start, end, stopping)

    @background(every=KEY_SWEEP)
    def forget_old_keys(self) -> None:
        self.engine.tell(lambda core, now: core.forget_keys(now))

    @background(every=QUOTA_SWEEP)
    def forget_full_quotas(self) -> None:
        self.quotas.prune(time.monotonic())

    @background(every=lambda self: float(self.config.prune_interval))
    def prune_finished(self) -> None:
        self.engine.tell(lambda core, now: core.prune(now))

    # -- tasks --------------------------------------------------------------------------------------

    @rpc(inline=True)
    def submit(self, req: TaskSubmit, ctx: CallContext) -> Deferred:
        if not req.more:
            session_id = session_for(ctx.caller, req.session_id, "submit")
            check_submit_queue(ctx.caller, req.queue)
            charge = self._task_charge(ctx, session_id, req.retry.maximum_attempts, "retry.maximum_attempts")

            def apply(core, now):
                task, duplicate = core.submit(req, session_id, now, charge)
                return TaskSubmitResult(task=task, duplicate=duplicate)

            return self.engine.defer(apply)
        items = [req, *req.more]
        session_ids = []
        for n, item in enumerate(items):
            with named_item(n):
                if n and item.more:
                    raise invalid("a task in a task.submit's more has a more of its own", field="more")
                session_ids.append(session_for(ctx.caller, item.session_id, "submit"))
                check_submit_queue(ctx.caller, item.queue)
        attempts = sum(item.retry.maximum_attempts for item in items)
        # an agent's tasks are all its own session's
        charge = self._task_charge(ctx, session_ids[0], attempts, "more")

        def apply_batch(core, now):
            first, *rest = [
                TaskSubmitResult(task=task, duplicate=duplicate)
                for task, duplicate in core.submit_batch(items, session_ids, now, charge)
            ]
            first.more = rest
            return first

        return self.engine.defer(apply_batch)

    def _task_charge(self, ctx: CallContext, session_id: str, attempts: int, field: str) -> Charge | None:
        """What counts the attempts of the tasks an agent's submit creates against its session's quota
        (host callers have none): a task failed at once by a worker of the same session retries at once, up
        to retry.maximum_attempts (1000), each attempt events and a rewrite of its row. The engine charges
        only the tasks it creates, once nothing else refuses them: a refused submit, or a client's retry
        that finds its key's task, spends nothing. A submit of more attempts than the quota's whole minute
        is refused here: no wait lets it in."""
        if is_host(ctx.caller):
            return None
        oversized = self.quotas.oversized("tasks", attempts)
        if oversized is not None:
            raise invalid(oversized, field=field, session_id=session_id)

        def charge(created: int) -> None:
            refusal = self.quotas.refusal(session_id, {"tasks": created}, time.monotonic())
            if refusal is not None:
                raise exhausted(refusal.message, session_id=session_id, kind="tasks")

        return charge

    @rpc
    def get(self, req: TaskGet, ctx: CallContext) -> TaskInfo:
        scope = scope_of(ctx.caller, "read")
        task = self.store.get(req.id)
        if task is None or not visible(task, scope):
            raise not_found(f"no task {req.id}", id=req.id)
        return task

    @rpc
    def list(self, req: TaskList, ctx: CallContext) -> TaskPage:
        scope = scope_of(ctx.caller, "read")
        session_id = req.session_id if scope is None else scope
        if scope is not None and req.session_id not in ("", scope):
            return TaskPage(tasks=[])
        tasks, next_cursor = self.store.list(req.states, req.queue, session_id, req.limit, req.cursor)
        return TaskPage(tasks=tasks, next_cursor=next_cursor)

    @rpc(stream=True)
    def wait(self, req: TaskWait, ctx: CallContext) -> Iterator[TaskProgressReport | TaskFinished]:
        scope = scope_of(ctx.caller, "read")
        with self.streams.hold("wait for tasks", scope, "wait"):
            outbox: queue.SimpleQueue[TaskProgressReport | TaskFinished] = queue.SimpleQueue()
            push = outbox.put
            finished = self.engine.call(lambda core, now: core.wait_open(req.id, scope, push), ctx)
            if finished is not None:
                yield finished
                return
            try:
                for item in self._drain(outbox, ctx):
                    yield item
                    if isinstance(item, TaskFinished):
                        return
                if not ctx.cancelled.is_set():
                    raise BusError(
                        ErrorCode.TIMEOUT,
                        f"task {req.id} did not finish within the call's deadline",
                        {"id": req.id},
                    )
            finally:
                self.engine.tell(lambda core, now: core.wait_closed(req.id, push))

    @rpc
    def cancel(self, req: TaskCancel, ctx: CallContext) -> TaskInfo:
        scope = scope_of(ctx.caller, "submit")
        return self.engine.call(lambda core, now: core.cancel(req.id, scope, req.reason, now), ctx)

    @rpc
    def requeue(self, req: TaskRequeue, ctx: CallContext) -> TaskInfo:
        scope = scope_of(ctx.caller, "submit")
        return self.engine.call(lambda core, now: core.requeue(req.id, scope, now), ctx)

    @on_event("session.closed")
    def on_session_closed(self, event: SessionClosed) -> None:
        self.engine.tell(lambda core, now: core.session_closed(event.session_id, now))

    # -- workers ------------------------------------------------------------------------------------

    @staticmethod
    def _drain(outbox: queue.SimpleQueue, ctx: CallContext) -> Iterator[Any]:
        """What the engine pushes into a stream's outbox, until the caller leaves or its deadline passes."""
        while not ctx.cancelled.is_set() and ctx.remaining() > 0:
            try:
                yield outbox.get(timeout=min(STREAM_CHECK, max(0.0, ctx.remaining())))
            except queue.Empty:
                continue

    @rpc(stream=True)
    def work(self, req: TaskWork, ctx: CallContext) -> Iterator[TaskAssignment]:
        scope = scope_of(ctx.caller, "work")
        with self.streams.hold("take work", scope, "work"):
            outbox: queue.SimpleQueue[TaskAssignment | None] = queue.SimpleQueue()
            stream = object()
            key = self.engine.call(lambda core, now: core.work_open(req, scope, outbox.put, stream, now), ctx)
            try:
                for item in self._drain(outbox, ctx):
                    if item is None:  # the same worker opened a newer stream
                        return
                    yield item
            finally:
                self.engine.tell(lambda core, now: core.work_closed(key, stream))

    @rpc(inline=True)
    def ack(self, req: TaskAck, ctx: CallContext) -> Deferred:
        scope = scope_of(ctx.caller, "work")
        return self.engine.defer(lambda core, now: core.ack(req.task_id, req.lease_id, scope, now) or Empty())

    @rpc(inline=True)
    def heartbeat(self, req: TaskHeartbeat, ctx: CallContext) -> Deferred:
        scope = scope_of(ctx.caller, "work")

        def apply(core, now):
            return TaskHeartbeatResult(cancel_requested=core.heartbeat(req.task_id, req.lease_id, scope, now))

        return self.engine.defer(apply)

    @rpc(inline=True)
    def progress(self, req: TaskProgress, ctx: CallContext) -> Deferred:
        scope = scope_of(ctx.caller, "work")
        return self.engine.defer(lambda core, now: core.progress(req, scope, now) or Empty())

    @rpc(inline=True)
    def complete(self, req: TaskComplete, ctx: CallContext) -> Deferred:
        scope = scope_of(ctx.caller, "work")
        if req.more:
            return self.engine.defer(lambda core, now: core.complete_batch(req, scope, now))
        return self.engine.defer(lambda core, now: core.complete(req, scope, now) or TaskCompleteResult())

    @rpc
    def workers(self, req: TaskWorkers, ctx: CallContext) -> TaskWorkersResult:
        scope = scope_of(ctx.caller, "read")
        return self.engine.call(lambda core, now: TaskWorkersResult(workers=core.worker_list(scope)), ctx)

    # -- schedules ----------------------------------------------------------------------------------

    @rpc
    def schedule_add(self, req: TaskScheduleAdd, ctx: CallContext) -> ScheduleInfo:
        session_id = session_for(ctx.caller, req.session_id, "submit")
        return self.engine.call(lambda core, now: core.add_schedule(req, session_id, now), ctx)

    @rpc
    def schedule_list(self, req: TaskScheduleList, ctx: CallContext) -> ScheduleListResult:
        scope = scope_of(ctx.caller, "read")
        if scope is not None and req.session_id not in ("", scope):
            return ScheduleListResult(schedules=[])
        return ScheduleListResult(
            schedules=self.store.list_schedules(req.session_id if scope is None else scope)
        )

    @rpc
    def schedule_remove(self, req: TaskScheduleRemove, ctx: CallContext) -> Empty:
        scope = scope_of(ctx.caller, "submit")
        self.engine.call(lambda core, now: core.remove_schedule(req.id, scope), ctx)
        return Empty()

    @rpc
    def schedule_pause(self, req: TaskSchedulePause, ctx: CallContext) -> ScheduleInfo:
        return self._pause(req.id, True, ctx)

    @rpc
    def schedule_resume(self, req: TaskScheduleResume, ctx: CallContext) -> ScheduleInfo:
        return self._pause(req.id, False, ctx)

    def _pause(self, schedule_id: str, paused: bool, ctx: CallContext) -> ScheduleInfo:
        scope = scope_of(ctx.caller, "submit")
        return self.engine.call(lambda core, now: core.pause_schedule(schedule_id, scope, paused, now), ctx)
