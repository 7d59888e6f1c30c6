"""Task scheduler messages (`task.*`, served by the `scheduler` process): tasks, workers, schedules.

A task is a piece of work on a queue: the scheduler keeps it durably, hands it under a lease to a worker
that took work on that queue (`task.work`, a stream), retries it with backoff when an attempt fails and
moves it to `dead` when it is out of attempts. Payloads and results are msgpack bytes, opaque to the
scheduler. Times are seconds since the epoch; durations are seconds; 0 means "none" for a timeout.

A queue needs no declaring: a task on a queue no worker takes stays `queued` (and `task.list` shows it).
"""

from __future__ import annotations

import enum
from typing import Annotated, ClassVar, Literal

import msgspec
from msgspec import Meta

from baaaht.schemas.base import Empty, Event, Request, Response
from baaaht.schemas.errors import ErrorCode
from baaaht.schemas.ids import ID_PATTERN, ID_RULE, MAX_ID, SessionFilter


def _name(what: str) -> Meta:
    return Meta(min_length=1, max_length=MAX_ID, pattern=ID_PATTERN, description=f"{what}: {ID_RULE}.")


TaskId = Annotated[str, _name("A task id")]
ScheduleId = Annotated[str, _name("A schedule id")]
QueueName = Annotated[str, _name("A queue name")]
TaskType = Annotated[str, _name("A task type")]
QueueFilter = Annotated[str, Meta(max_length=MAX_ID, pattern=f"^(?:{ID_PATTERN[1:-1]})?$")]
WorkerId = Annotated[str, _name("A worker id (chosen by the worker, kept across its reconnects)")]
LeaseId = Annotated[str, Meta(min_length=1, max_length=64)]
IdempotencyKey = Annotated[str, Meta(max_length=256, description="Empty: none.")]
Priority = Annotated[int, Meta(ge=-1000, le=1000, description="Higher runs first; then older first.")]
Seconds = Annotated[float, Meta(ge=0, le=10 * 365 * 86400, description="Seconds, 0 or more.")]
ErrorType = Annotated[str, Meta(max_length=128)]
MAX_ERROR_TEXT = 4096
ErrorText = Annotated[str, Meta(max_length=MAX_ERROR_TEXT)]
PageLimit = Annotated[int, Meta(ge=1, le=1000)]
MAX_PROGRESS_CHUNK = 256 * 1024  # bytes of one chunk of streamed output
MAX_PROGRESS_CHUNKS = 64  # chunks in one task.progress call
MAX_OUTCOMES = 256  # outcomes in the `more` of one task.complete call
MAX_SUBMITS = 256  # tasks in the `more` of one task.submit call
LEASE_BATCH_BYTES = 256 * 1024  # of payloads in one task.work partial (a larger lease goes alone)
ProgressChunk = Annotated[bytes, Meta(max_length=MAX_PROGRESS_CHUNK)]
Cursor = Annotated[int, Meta(ge=0)]

# The error types the scheduler itself gives an attempt it ends.
HEARTBEAT_TIMEOUT = "HeartbeatTimeout"
START_TO_CLOSE_TIMEOUT = "StartToCloseTimeout"
SCHEDULE_TO_START_TIMEOUT = "ScheduleToStartTimeout"
WORKER_LOST = "WorkerLost"


class TaskState(str, enum.Enum):
    """queued -> running -> succeeded | failed | cancelled | dead; a failed attempt with attempts left
    goes back to queued (after its backoff)."""

    QUEUED = "queued"  # waiting for a worker (or for its not-before time, or its retry backoff)
    LEASED = "leased"  # leased, not acknowledged: only in a store of a version whose workers acked first
    RUNNING = "running"  # leased to a worker (the lease is the start: no acknowledgement waited for)
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # a non-retryable error, or its schedule-to-start timeout passed
    CANCELLED = "cancelled"
    DEAD = "dead"  # out of attempts: inspect with `task.get`, run again with `task.requeue`


TERMINAL = frozenset({TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED, TaskState.DEAD})
Overlap = Literal["skip", "buffer_one", "allow"]
Jitter = Literal["full", "none"]
Outcome = Literal["succeeded", "failed", "cancelled"]


class RetryPolicy(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Temporal's retry semantics: the n-th retry waits min(initial_interval * backoff_coefficient**(n-1),
    maximum_interval), with full jitter a uniform random part of that."""

    initial_interval: Annotated[float, Meta(gt=0, le=86400)] = 1.0
    backoff_coefficient: Annotated[float, Meta(ge=1, le=100)] = 2.0
    maximum_interval: Annotated[float, Meta(gt=0, le=7 * 86400)] = 100.0
    maximum_attempts: Annotated[int, Meta(ge=1, le=1000)] = 5
    non_retryable_errors: list[ErrorType] = []  # error types that fail the task at once
    jitter: Jitter = "full"


class Timeouts(msgspec.Struct, kw_only=True, omit_defaults=True):
    """0: none, except `heartbeat`: 0 is the scheduler's `scheduler.lease_timeout`."""

    schedule_to_start: Seconds = 0.0  # queued (once due) this long without starting: failed, not retried
    start_to_close: Seconds = 0.0  # an attempt running this long is ended and retried
    heartbeat: Seconds = 0.0  # no heartbeat for this long: the lease expires and the attempt is retried


class TaskAttempt(msgspec.Struct, kw_only=True, omit_defaults=True):
    number: int
    worker: str
    leased_at: float
    started_at: float = 0.0
    ended_at: float = 0.0
    error_type: str = ""
    error: str = ""


class TaskInfo(Response, kw_only=True):
    id: str
    queue: str
    task_type: str
    payload: bytes = b""
    priority: int = 0
    session_id: str = ""
    key: str = ""
    state: TaskState
    not_before: float = 0.0  # not started before this time (a delay, or a retry's backoff)
    timeouts: Timeouts = msgspec.field(default_factory=Timeouts)
    retry: RetryPolicy = msgspec.field(default_factory=RetryPolicy)
    attempts: list[TaskAttempt] = []
    attempts_before_requeue: int = 0  # attempts made before the last requeue (not counted against it)
    result: bytes = b""
    error_type: str = ""  # of the last failed attempt, or the reason it ended
    error: str = ""
    cancel_requested: bool = False
    schedule_id: str = ""
    created_at: float
    updated_at: float
    finished_at: float = 0.0


class TaskPage(Response, kw_only=True):
    tasks: list[TaskInfo]
    next_cursor: int = 0


class TaskSubmitResult(Response, kw_only=True):
    task: TaskInfo
    duplicate: bool = False  # the idempotency key was seen: this is the first task with it
    more: list[TaskSubmitResult] = []  # of the submit's `more`, in its order


class TaskSubmit(Request, tag="task.submit", kw_only=True):
    """Answered once the task is durable. With a `key`, a second submit (in the same session) within
    `scheduler.key_retention` answers the first task, duplicate=True. A caller with many tasks to submit
    at once puts the others in `more` (each with no `more` of its own): one call, one commit, all of
    them accepted or, when one is refused, none (the error names it: `more[i]`); the answer's `more`
    has their results in the same order."""

    response: ClassVar[type] = TaskSubmitResult

    queue: QueueName
    task_type: TaskType
    payload: bytes = b""  # msgpack; empty: none
    priority: Priority = 0
    session_id: SessionFilter = ""  # an assistant's tasks are always in its own session
    key: IdempotencyKey = ""
    delay: Seconds = 0.0
    not_before: Seconds = 0.0  # an absolute time; the later of it and now + delay counts
    timeouts: Timeouts = msgspec.field(default_factory=Timeouts)
    retry: RetryPolicy = msgspec.field(default_factory=RetryPolicy)
    more: Annotated[list[TaskSubmit], Meta(max_length=MAX_SUBMITS)] = []


class TaskGet(Request, tag="task.get", kw_only=True):
    response: ClassVar[type] = TaskInfo

    id: TaskId


class TaskList(Request, tag="task.list", kw_only=True):
    """Tasks oldest first matching every filter given."""

    response: ClassVar[type] = TaskPage

    states: list[TaskState] = []
    queue: QueueFilter = ""
    session_id: SessionFilter = ""
    limit: PageLimit = 100
    cursor: Cursor = 0


class TaskCancel(Request, tag="task.cancel", kw_only=True):
    """A queued task never starts; a running one is asked to stop (its handler sees it) and ends
    cancelled when it answers, or after `scheduler.cancel_grace`. A finished task is refused."""

    response: ClassVar[type] = TaskInfo

    id: TaskId
    reason: ErrorText = ""


class TaskRequeue(Request, tag="task.requeue", kw_only=True):
    """Queue a dead, failed or cancelled task again, with its full number of attempts."""

    response: ClassVar[type] = TaskInfo

    id: TaskId


# -- workers ----------------------------------------------------------------------------------------


class TaskAssignment(Response, kw_only=True):
    """One partial of `task.work`: a task leased to this worker, or a cancel of one it holds. The leases
    one scheduler turn gives a worker come in one partial: the first, the others in its `more` (each with
    no `more` of its own; a batch holds at most LEASE_BATCH_BYTES of payloads, beyond one lease's)."""

    kind: Literal["lease", "cancel"]
    task_id: str
    lease_id: str
    queue: str = ""
    task_type: str = ""
    payload: bytes = b""
    session_id: str = ""
    attempt: int = 0
    heartbeat_timeout: float = 0.0  # heartbeat well within this (the library: every third of it)
    start_to_close: float = 0.0
    reason: str = ""  # of a cancel
    more: list[TaskAssignment] = []  # leases given with this one (only on a lease)


class TaskWork(Request, tag="task.work", kw_only=True):
    """Take work: a stream on which the scheduler pushes leases (at most `slots` held at once) and
    cancels. `held`: the leases this worker still works on from an earlier stream (after a reconnect);
    any other lease it had is given up. A `worker` caller gets only its own session's tasks."""

    response: ClassVar[type] = TaskAssignment

    worker_id: WorkerId
    queues: Annotated[list[QueueName], Meta(min_length=1, max_length=64)]
    slots: Annotated[int, Meta(ge=1, le=1024)] = 1
    held: list[LeaseId] = []


class TaskAck(Request, tag="task.ack", kw_only=True):
    """Optional: the lease started the task already; an ack keeps the lease like a heartbeat."""

    response: ClassVar[type] = Empty

    task_id: TaskId
    lease_id: LeaseId


class TaskHeartbeatResult(Response, kw_only=True):
    cancel_requested: bool = False


class TaskHeartbeat(Request, tag="task.heartbeat", kw_only=True):
    """Keep the lease; a lease that is no longer the worker's is answered FAILED_PRECONDITION."""

    response: ClassVar[type] = TaskHeartbeatResult

    task_id: TaskId
    lease_id: LeaseId


class TaskRefused(msgspec.Struct, kw_only=True):
    """An outcome of a task.complete batch the scheduler did not record, and why."""

    lease_id: LeaseId
    code: ErrorCode
    message: ErrorText = ""


class TaskCompleteResult(Response, kw_only=True):
    refused: list[TaskRefused] = []  # of the outcomes in `more` and the call's own (empty with no `more`)


class TaskComplete(Request, tag="task.complete", kw_only=True):
    """The attempt's outcome; recorded once (a second report, or one for a lease no longer the worker's,
    is answered FAILED_PRECONDITION). A worker whose attempts end together reports them in one call:
    the others in `more` (each with no `more` of its own). Then each is recorded or refused on its own,
    and the refused ones are listed in the answer instead of failing the call."""

    response: ClassVar[type] = TaskCompleteResult

    task_id: TaskId
    lease_id: LeaseId
    outcome: Outcome
    result: bytes = b""  # msgpack, of a success
    error_type: ErrorType = ""
    error: ErrorText = ""
    non_retryable: bool = False
    more: Annotated[list[TaskComplete], Meta(max_length=MAX_OUTCOMES)] = []


class TaskProgress(Request, tag="task.progress", kw_only=True):
    """Streamed output of the attempt a lease holds: `chunks` numbered from `seq` on (1 is the first
    of an attempt), opaque to the scheduler, which publishes each as a `task.progress` event and hands
    it to the task's waiters, keeping none of it. Counts as a heartbeat. A chunk numbered at most the
    last one received (a call retried after a lost answer) is dropped. A lease that is no longer the
    worker's is answered FAILED_PRECONDITION."""

    response: ClassVar[type] = Empty

    task_id: TaskId
    lease_id: LeaseId
    seq: Annotated[int, Meta(ge=1)]
    chunks: Annotated[list[ProgressChunk], Meta(min_length=1, max_length=MAX_PROGRESS_CHUNKS)]


class WorkerInfo(msgspec.Struct, kw_only=True):
    worker_id: str
    queues: list[str]
    slots: int
    in_use: int
    connected: bool
    session_id: str = ""  # a worker agent takes only this session's tasks
    last_seen: float  # its last heartbeat or call


class TaskWorkersResult(Response, kw_only=True):
    workers: list[WorkerInfo]


class TaskWorkers(Request, tag="task.workers", kw_only=True):
    response: ClassVar[type] = TaskWorkersResult


# -- waiting for a task -----------------------------------------------------------------------------


class TaskProgressReport(Response, tag_field="kind", tag="progress", kw_only=True):
    """A partial of `task.wait`: one chunk of the task's streamed output (see TaskProgress)."""

    task_id: str
    attempt: int  # seq starts again at 1 with each attempt
    seq: int
    data: bytes


class TaskFinished(TaskInfo, tag_field="kind", tag="finished", kw_only=True):
    """The last partial of `task.wait`: the task once it is finished."""


class TaskWait(Request, tag="task.wait", kw_only=True):
    """A stream: the task's output as it comes (TaskProgressReport, from the moment of the call on),
    then the task once it is succeeded, failed, cancelled or dead (TaskFinished: at once if it already
    is), and the stream ends. Bounded by the call's deadline: a task not finished by then is answered
    TIMEOUT. Who may read the task may wait for it."""

    response: ClassVar[object] = TaskProgressReport | TaskFinished

    id: TaskId


# -- schedules --------------------------------------------------------------------------------------


class ScheduleSpec(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What a schedule runs and when: the fields its request and its record share."""

    cron: Annotated[str, Meta(max_length=256)] = ""
    every: Annotated[float, Meta(ge=0, le=366 * 86400)] = 0.0
    queue: QueueName
    task_type: TaskType
    payload: bytes = b""
    priority: Priority = 0
    session_id: SessionFilter = ""
    timeouts: Timeouts = msgspec.field(default_factory=Timeouts)
    retry: RetryPolicy = msgspec.field(default_factory=RetryPolicy)
    overlap: Overlap = "skip"
    paused: bool = False


class ScheduleInfo(Response, ScheduleSpec, kw_only=True):
    id: str
    catch_up_window: float = 0.0
    next_run_at: float = 0.0
    last_run_at: float = 0.0
    last_task_id: str = ""
    buffered: bool = False  # buffer_one: one run waits for the running one to finish
    runs: int = 0
    created_at: float


class TaskScheduleAdd(Request, ScheduleSpec, tag="task.schedule.add", kw_only=True):
    """A recurring task: `cron` (five fields, UTC) or `every` seconds, exactly one. A run that comes
    while the last one has not finished is skipped, buffered (one at most) or started anyway
    (`overlap`); runs missed while the scheduler was down are made up by one run when the latest was
    less than `catch_up_window` ago, else skipped."""

    response: ClassVar[type] = ScheduleInfo

    catch_up_window: Seconds = 60.0


class ScheduleListResult(Response, kw_only=True):
    schedules: list[ScheduleInfo]


class TaskScheduleList(Request, tag="task.schedule.list", kw_only=True):
    response: ClassVar[type] = ScheduleListResult

    session_id: SessionFilter = ""


class TaskScheduleRemove(Request, tag="task.schedule.remove", kw_only=True):
    response: ClassVar[type] = Empty

    id: ScheduleId


class TaskSchedulePause(Request, tag="task.schedule.pause", kw_only=True):
    """No runs until it is resumed."""

    response: ClassVar[type] = ScheduleInfo

    id: ScheduleId


class TaskScheduleResume(Request, tag="task.schedule.resume", kw_only=True):
    """Runs from now on; what was missed while paused is not made up."""

    response: ClassVar[type] = ScheduleInfo

    id: ScheduleId


# -- events -----------------------------------------------------------------------------------------


class TaskEvent(Event, kw_only=True):
    """What every task event says; published as `<tag>/<session id>` for a session's task."""

    task_id: str
    queue: str
    task_type: str
    session_id: str = ""
    attempt: int = 0
    state: TaskState


class TaskQueued(TaskEvent, tag="task.queued", kw_only=True):
    not_before: float = 0.0


class TaskStarted(TaskEvent, tag="task.started", kw_only=True):
    worker: str


class TaskRetrying(TaskEvent, tag="task.retrying", kw_only=True):
    error_type: str = ""
    error: str = ""
    retry_at: float


class TaskSucceeded(TaskEvent, tag="task.succeeded", kw_only=True):
    pass


class TaskFailed(TaskEvent, tag="task.failed", kw_only=True):
    error_type: str = ""
    error: str = ""


class TaskCancelled(TaskEvent, tag="task.cancelled", kw_only=True):
    reason: str = ""


class TaskDead(TaskEvent, tag="task.dead", kw_only=True):
    error_type: str = ""
    error: str = ""


class TaskProgressed(Event, tag="task.progress", kw_only=True):
    """One chunk of a running task's streamed output (see TaskProgress); published as
    `task.progress/<session id>` for a session's task."""

    task_id: str
    session_id: str = ""
    attempt: int
    seq: int
    data: bytes
