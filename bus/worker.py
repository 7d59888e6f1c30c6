"""Workers of the task scheduler, on asyncio: take tasks from queues, run handlers, report.

    async def resize(task: WorkerTask) -> dict:
        ...                                   # task.payload is the decoded msgpack payload
        return {"done": True}                 # the result (msgpack-able)

    async with AsyncBusClient.for_config(config) as bus:
        await Worker(bus, queues=["images"], slots=4, handlers={"resize": resize}).run()

Workers never register as services: a worker opens the streaming call `task.work`, on which the
scheduler pushes the tasks it leases to it (at most `slots` at once; those of one scheduler turn in one
message) and cancels. A lease is the start of the task (nothing to acknowledge); the worker heartbeats
it while the handler runs (`task.heartbeat`, every third of the task's heartbeat timeout) and reports
its outcome once (`task.complete`): a no-op task costs two calls, its submit and its outcome, and the
outcomes of tasks that end while one is being reported share the next call.

A handler streams output with `task.progress(data)` (bytes, opaque to the scheduler: a waiter and the
`task.progress` events get each chunk as it was given): it returns at once; the chunks go out in order,
at most one `task.progress` call in flight per task, what comes meanwhile coalesced into the next call,
and all of them before the outcome is reported.

- A handler that returns succeeds; one that raises fails its attempt with the exception's class name as
  the error type (retried by the task's policy), NonRetryableError fails the task at once.
- A cancel (from the scheduler, a closed session, or a timeout the scheduler saw) cancels the handler's
  asyncio task: the handler sees CancelledError (and `task.cancelled` is set first).
- A lease the scheduler no longer honours (it expired) cancels the handler and reports nothing.
- The broker away (a restart): the stream is opened again, with the leases still being worked on, and
  reports are retried until they get through or the lease is surely gone.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import msgspec

from baaaht.bus.aio import AsyncBusClient
from baaaht.bus.errors import BusError
from baaaht.schemas.errors import ErrorCode
from baaaht.schemas.tasks import (
    MAX_ERROR_TEXT,
    MAX_OUTCOMES,
    MAX_PROGRESS_CHUNK,
    MAX_PROGRESS_CHUNKS,
    TaskAssignment,
    TaskComplete,
    TaskCompleteResult,
    TaskHeartbeat,
    TaskProgress,
    TaskWork,
)

log = logging.getLogger("baaaht.worker")

STREAM_TIMEOUT = 600.0  # seconds one task.work stream lasts before it is opened again
RETRY_FIRST, RETRY_MOST = 0.05, 2.0  # seconds between attempts to reach an absent broker
PROGRESS_BATCH_BYTES = 1024 * 1024  # of the chunks coalesced into one task.progress call

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode


def heartbeat_every(timeout: float) -> float:
    """Seconds between a running task's heartbeats: a third of its heartbeat timeout."""
    return max(0.01, timeout / 3)


class NonRetryableError(Exception):
    """Raise from a handler to fail the task without retrying it; `error_type` names the failure (the
    class name when empty)."""

    def __init__(self, message: str, error_type: str = ""):
        super().__init__(message)
        self.error_type = error_type or type(self).__name__


class LeaseLost(Exception):
    """The scheduler no longer takes reports for this lease."""


class ProgressSender:
    """A task's streamed output on its way to the scheduler: in order, one call in flight at a time."""

    def __init__(self, task_id: str, lease_id: str, report: Callable[[TaskProgress], Awaitable[Any]]):
        self.task_id, self.lease_id = task_id, lease_id
        self.report = report
        self.pending: list[bytes] = []
        self.next_seq = 1
        self.sending: asyncio.Task | None = None
        self.lost = False

    def add(self, data: bytes) -> None:
        if len(data) > MAX_PROGRESS_CHUNK:
            raise ValueError(
                f"a progress chunk is {len(data)} bytes, more than the {MAX_PROGRESS_CHUNK} allowed"
            )
        if self.lost:
            return
        self.pending.append(bytes(data))
        if self.sending is None:
            self.sending = asyncio.get_running_loop().create_task(self._send())

    async def _send(self) -> None:
        try:
            while self.pending and not self.lost:
                batch, size = [], 0
                while self.pending and len(batch) < MAX_PROGRESS_CHUNKS:
                    if batch and size + len(self.pending[0]) > PROGRESS_BATCH_BYTES:
                        break
                    size += len(self.pending[0])
                    batch.append(self.pending.pop(0))
                call = TaskProgress(
                    task_id=self.task_id, lease_id=self.lease_id, seq=self.next_seq, chunks=batch
                )
                self.next_seq += len(batch)
                try:
                    await self.report(call)
                except LeaseLost:
                    self.lost = True
                    self.pending.clear()
        finally:
            self.sending = None

    async def flush(self) -> None:
        """Until every chunk given so far was sent (or the lease was lost)."""
        while self.sending is not None:
            await asyncio.shield(self.sending)


class OutcomeSender:
    """A worker's outcomes on their way to the scheduler. One that ends with nothing waiting to go out
    is reported at once, from its own task; those that end while it waits for its answer go out
    together in the next call, one loop turn later, without waiting for that answer (the answer comes
    after the scheduler's commit, and the slot is free at the scheduler as soon as the outcome is
    applied): a worker whose slots finish together makes one call for them, not one each, and a slot
    never waits a commit for its next task."""

    def __init__(self, report: Callable[[TaskComplete, float], Awaitable[TaskCompleteResult]]):
        self.report = report
        self.pending: list[tuple[TaskComplete, float, asyncio.Future]] = []
        self.in_flight = 0  # task.complete calls sent, not yet answered
        self.flushing: asyncio.Task | None = None  # the task that sends what is pending
        self.calls: set[asyncio.Task] = set()  # the flushes whose calls are out (cancelled on stop)

    async def send(self, outcome: TaskComplete, until: float) -> None:
        """Once the scheduler recorded `outcome`; LeaseLost when it did not (`until`: see _report)."""
        loop = asyncio.get_running_loop()
        if not self.in_flight and self.flushing is None:
            # Nothing on its way: reported from here at once, not a loop turn later by a task (a worker's
            # one slot is free again at the scheduler only once it has this).
            self.in_flight += 1
            try:
                await self.report(outcome, until)
            finally:
                self.in_flight -= 1
            return
        recorded = loop.create_future()  # cancelled with its awaiter (the worker stopping)
        self.pending.append((outcome, until, recorded))
        if self.flushing is None:
            self._flush_soon()
        await recorded

    def _flush_soon(self) -> None:
        """What is pending goes out in one call from a task of its own, on the next loop turn."""
        self.flushing = asyncio.get_running_loop().create_task(self._send())
        self.calls.add(self.flushing)
        self.flushing.add_done_callback(self.calls.discard)

    def cancel(self) -> None:
        """The worker stops: the calls still out are given up (their outcomes' awaiters see LeaseLost)."""
        for call in list(self.calls):
            call.cancel()

    async def _send(self) -> None:
        batch = self.pending[: MAX_OUTCOMES + 1]
        del self.pending[: len(batch)]
        # What ends from now on goes in another call (or, past MAX_OUTCOMES, the rest at once).
        self.flushing = None
        if self.pending:
            self._flush_soon()
        self.in_flight += 1
        lost: dict[str, LeaseLost] | None = None  # by lease id, once the call was answered
        try:
            first, rest = batch[0][0], [outcome for outcome, _, _ in batch[1:]]
            request = msgspec.structs.replace(first, more=rest) if rest else first
            answer = await self.report(request, max(until for _, until, _ in batch))
            lost = {r.lease_id: LeaseLost(f"{r.code.value}: {r.message}") for r in answer.refused}
        except LeaseLost as exc:
            lost = {outcome.lease_id: exc for outcome, _, _ in batch}
        finally:
            self.in_flight -= 1
            for outcome, _, recorded in batch:
                if recorded.done():
                    continue
                if lost is None:  # this sender was stopped (or failed) before the answer
                    recorded.set_exception(LeaseLost("the outcome's report was interrupted"))
                elif outcome.lease_id in lost:
                    recorded.set_exception(lost[outcome.lease_id])
                else:
                    recorded.set_result(None)


@dataclass
class WorkerTask:
    """What a handler is given."""

    id: str
    queue: str
    type: str
    payload: Any
    session_id: str
    attempt: int
    lease_id: str
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)  # set before the handler is cancelled
    sender: ProgressSender | None = field(default=None, repr=False)

    def progress(self, data: bytes) -> None:
        """Stream a chunk of output (at most MAX_PROGRESS_CHUNK bytes); never blocks. Call it on the
        worker's event loop."""
        if self.sender is None:
            raise RuntimeError("this task has no lease to report progress on")
        self.sender.add(data)


Handler = Callable[[WorkerTask], Awaitable[Any]]


class Worker:
    def __init__(
        self,
        bus: AsyncBusClient,
        queues: list[str],
        slots: int,
        handlers: dict[str, Handler],
        *,
        worker_id: str = "",
        stream_timeout: float = STREAM_TIMEOUT,
    ):
        self.bus = bus
        self.queues = list(queues)
        self.slots = slots
        self.handlers = handlers
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{id(self):x}"
        self.stream_timeout = stream_timeout
        self.running: dict[str, tuple[WorkerTask, asyncio.Task]] = {}  # by lease id
        self.streams_opened = 0  # how many task.work streams this worker has opened (1 + reconnects)
        self.retry_pause = RETRY_FIRST  # before opening task.work again after a failure
        self.outcomes = OutcomeSender(self._report)

    async def run(self) -> None:
        """Take work until cancelled; the tasks still running are cancelled (and reported) on the way out."""
        try:
            while True:
                request = TaskWork(
                    worker_id=self.worker_id, queues=self.queues, slots=self.slots, held=list(self.running)
                )
                try:
                    self.streams_opened += 1
                    # Each partial is taken as it is read: its handlers start on the next turn of the loop.
                    await self.bus.stream_to(request, self._take_all, timeout=self.stream_timeout)
                    self.retry_pause = RETRY_FIRST  # the stream ended (the scheduler restarted): open another
                except BusError as exc:
                    if exc.code is ErrorCode.TIMEOUT:
                        continue  # its deadline came: open the next at once
                    if exc.code is ErrorCode.PERMISSION_DENIED or exc.code is ErrorCode.INVALID_ARGUMENT:
                        raise
                    log.info(
                        "task.work interrupted", extra={"reason": exc.message, "retry_in": self.retry_pause}
                    )
                    await asyncio.sleep(self.retry_pause)
                    self.retry_pause = min(RETRY_MOST, self.retry_pause * 2)
        finally:
            for _task, runner in list(self.running.values()):
                runner.cancel()
            if self.running:
                await asyncio.gather(
                    *(runner for _t, runner in self.running.values()), return_exceptions=True
                )
            self.outcomes.cancel()

    def _take_all(self, assignment: TaskAssignment) -> None:
        self.retry_pause = RETRY_FIRST  # the stream serves: a failure after it is the first in a row
        self._take(assignment)
        for lease in assignment.more:  # the others the scheduler leased in one turn
            self._take(lease)

    def _take(self, assignment: TaskAssignment) -> None:
        if assignment.kind == "cancel":
            held = self.running.get(assignment.lease_id)
            if held is not None:
                held[0].cancelled.set()
                held[1].cancel()
            return
        if assignment.lease_id in self.running:
            return
        task = WorkerTask(
            id=assignment.task_id,
            queue=assignment.queue,
            type=assignment.task_type,
            payload=_decode(assignment.payload) if assignment.payload else None,
            session_id=assignment.session_id,
            attempt=assignment.attempt,
            lease_id=assignment.lease_id,
        )
        timeout = assignment.heartbeat_timeout
        task.sender = ProgressSender(
            task.id, task.lease_id, lambda call: self._report(call, time.monotonic() + timeout)
        )
        runner = asyncio.create_task(self._work(task, assignment.heartbeat_timeout))
        self.running[task.lease_id] = (task, runner)

    async def _work(self, task: WorkerTask, heartbeat_timeout: float) -> None:
        try:
            handler = self.handlers.get(task.type)
            handler_task = asyncio.current_task()
            # A timer, not a task, until the first heartbeat is due: most tasks end before it (a task
            # made and cancelled for each was a good part of a short task's cost on the worker).
            beating: list[asyncio.Task] = []
            first_beat = asyncio.get_running_loop().call_later(
                heartbeat_every(heartbeat_timeout),
                lambda: beating.append(
                    asyncio.create_task(self._heartbeat(task, heartbeat_timeout, handler_task))
                ),
            )
            try:
                if handler is None:
                    raise NonRetryableError(f"this worker has no handler for task type {task.type!r}")
                result = await handler(task)
                outcome = TaskComplete(
                    task_id=task.id,
                    lease_id=task.lease_id,
                    outcome="succeeded",
                    result=b"" if result is None else _encode(result),
                )
            except asyncio.CancelledError:
                if not task.cancelled.is_set():
                    raise  # the worker is stopping, or the lease was lost: nothing to report
                asyncio.current_task().uncancel()  # the cancel was the task's, not this worker's
                outcome = TaskComplete(task_id=task.id, lease_id=task.lease_id, outcome="cancelled")
            except Exception as exc:
                outcome = TaskComplete(
                    task_id=task.id,
                    lease_id=task.lease_id,
                    outcome="failed",
                    error_type=(exc.error_type if isinstance(exc, NonRetryableError) else type(exc).__name__)[
                        :128
                    ],
                    error=str(exc)[:MAX_ERROR_TEXT],
                    non_retryable=isinstance(exc, NonRetryableError),
                )
            finally:
                first_beat.cancel()
                for beat in beating:
                    beat.cancel()
            await task.sender.flush()  # the output before the outcome: a waiter gets it all
            await self.outcomes.send(outcome, time.monotonic() + heartbeat_timeout)
        except LeaseLost:
            log.info("lease lost", extra={"task_id": task.id})
        finally:
            self.running.pop(task.lease_id, None)
            if task.sender.sending is not None:  # the worker is stopping
                task.sender.sending.cancel()

    async def _heartbeat(self, task: WorkerTask, timeout: float, handler_task: asyncio.Task) -> None:
        """Started when the first heartbeat is due: one now, then one every third of the timeout."""
        while True:
            try:
                answer = await self._report(
                    TaskHeartbeat(task_id=task.id, lease_id=task.lease_id), time.monotonic() + timeout
                )
            except LeaseLost:
                handler_task.cancel()
                return
            if answer.cancel_requested and not task.cancelled.is_set():
                task.cancelled.set()
                handler_task.cancel()
            await asyncio.sleep(heartbeat_every(timeout))

    async def _report(self, request, until: float) -> Any:
        """Call the scheduler until it answers or the lease is surely gone (`until`, monotonic)."""
        pause = RETRY_FIRST
        while True:
            try:
                return await self.bus.call(request, timeout=max(0.5, min(5.0, until - time.monotonic())))
            except BusError as exc:
                if exc.code is ErrorCode.FAILED_PRECONDITION:
                    raise LeaseLost(exc.message) from None
                if exc.code not in (ErrorCode.UNAVAILABLE, ErrorCode.TIMEOUT) or time.monotonic() >= until:
                    raise LeaseLost(f"{exc.code.value}: {exc.message}") from None
                await asyncio.sleep(pause)
                pause = min(RETRY_MOST, pause * 2)
