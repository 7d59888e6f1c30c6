"""`baaaht-ctl tasks ...`, `schedules ...` and `workers list`: the task scheduler.

Payloads and results are msgpack on the wire; here they are JSON: given as JSON text, shown decoded.
"""

from __future__ import annotations

from typing import Any, Optional

import msgspec
import orjson
import typer

from baaaht.bus.errors import BusError
from baaaht.common.units import parse_duration
from baaaht.ctl.common import Ctl, JsonOption, fail, interruptible, iso_time, json_line, option_value
from baaaht.schemas.bus import BusStats
from baaaht.schemas.tasks import (
    TERMINAL,
    RetryPolicy,
    ScheduleInfo,
    TaskCancel,
    TaskEvent,
    TaskGet,
    TaskInfo,
    TaskList,
    TaskRequeue,
    TaskScheduleAdd,
    TaskScheduleList,
    TaskSchedulePause,
    TaskScheduleRemove,
    TaskScheduleResume,
    TaskState,
    TaskSubmit,
    TaskWorkers,
)

app = typer.Typer(no_args_is_help=True, add_completion=False)
schedules_app = typer.Typer(no_args_is_help=True, add_completion=False)
workers_app = typer.Typer(no_args_is_help=True, add_completion=False)

PAGE = 1000
TASK_COLUMNS = ["id", "queue", "type", "state", "priority", "session", "attempts", "created", "error"]
TOPICS = ["task."]


def to_payload(text: Optional[str], what: str = "JSON") -> bytes:
    """JSON text as the msgpack bytes of the wire; None is no payload."""
    if text is None:
        return b""
    try:
        return msgspec.msgpack.encode(orjson.loads(text))
    except orjson.JSONDecodeError as exc:
        fail(f"{what} {text!r} is not valid JSON: {exc}")


def from_payload(data: bytes) -> Any:
    return msgspec.msgpack.decode(data) if data else None


def task_view(task: TaskInfo) -> dict:
    """A task with its payload and result decoded, for JSON and key: value output."""
    plain = msgspec.to_builtins(task)
    plain["payload"], plain["result"] = from_payload(task.payload), from_payload(task.result)
    return plain


def task_row(task: TaskInfo) -> dict:
    return {
        "id": task.id,
        "queue": task.queue,
        "type": task.task_type,
        "state": task.state.value
        + (" (cancelling)" if task.cancel_requested and task.state not in TERMINAL else ""),
        "priority": task.priority,
        "session": task.session_id,
        "attempts": len(task.attempts),
        "created": iso_time(task.created_at),
        "error": task.error_type,
    }


def seconds(option: str, text: Optional[str]) -> float:
    return 0.0 if text is None else float(option_value(option, text, parse_duration))


def show_tasks(ctl: Ctl, tasks: list[TaskInfo]) -> None:
    ctl.emit(
        [task_view(t) for t in tasks] if ctl.json else [task_row(t) for t in tasks],
        None if ctl.json else TASK_COLUMNS,
    )


def all_tasks(ctl: Ctl, states: list[TaskState], queue: str, session_id: str) -> list[TaskInfo]:
    found, cursor = [], 0
    while True:
        page = ctl.call(
            TaskList(states=states, queue=queue, session_id=session_id, limit=PAGE, cursor=cursor)
        )
        found.extend(page.tasks)
        if not page.next_cursor:
            return found
        cursor = page.next_cursor


@app.command()
def submit(
    ctx: typer.Context,
    queue: str = typer.Argument(..., help="The queue (pool of workers)."),
    task_type: str = typer.Argument(..., metavar="TYPE", help="The task type (the worker's handler)."),
    body: Optional[str] = typer.Argument(None, metavar="[JSON]", help="The payload, as JSON."),
    priority: int = typer.Option(0, "--priority", help="Higher runs first (-1000 to 1000)."),
    delay: Optional[str] = typer.Option(None, "--delay", help="Not before this long from now, e.g. 30s."),
    key: str = typer.Option("", "--key", help="Idempotency key: a second submit answers the first task."),
    session: str = typer.Option("", "--session", help="The session the task belongs to."),
    max_attempts: int = typer.Option(5, "--max-attempts", min=1, help="Attempts before the task is dead."),
    wait: bool = typer.Option(False, "--wait", help="Wait until it finishes; exit 1 unless it succeeded."),
    _json: JsonOption = False,
) -> None:
    """Queue a task (answered once it is durable)."""
    ctl: Ctl = ctx.obj
    request = TaskSubmit(
        queue=queue,
        task_type=task_type,
        payload=to_payload(body),
        priority=priority,
        delay=seconds("--delay", delay),
        key=key,
        session_id=session,
        retry=RetryPolicy(maximum_attempts=max_attempts),
    )
    since = ctl.call(BusStats()).last_event_seq if wait else 0  # its events from here on are not missed
    submitted = ctl.call(request)
    if submitted.duplicate:
        typer.echo(f"the key {key!r} was seen: this is the first task with it", err=True)
    task = submitted.task
    if wait and task.state not in TERMINAL:
        follow(ctl, task.id, since, quiet=True)
        task = ctl.call(TaskGet(id=task.id))
    ctl.emit(task_view(task) if ctl.json else task_row(task))
    if wait and task.state is not TaskState.SUCCEEDED:
        raise typer.Exit(1)


@app.command("list")
def list_tasks(
    ctx: typer.Context,
    state: Optional[list[TaskState]] = typer.Option(None, "--state", help="Only these states (repeat)."),
    queue: str = typer.Option("", "--queue"),
    session: str = typer.Option("", "--session"),
    _json: JsonOption = False,
) -> None:
    """Tasks, oldest first (a queue nobody takes work from shows its tasks queued)."""
    ctl: Ctl = ctx.obj
    show_tasks(ctl, all_tasks(ctl, state or [], queue, session))


@app.command()
def get(
    ctx: typer.Context, task_id: str = typer.Argument(..., metavar="ID"), _json: JsonOption = False
) -> None:
    """A task with its attempts, payload and result."""
    ctl: Ctl = ctx.obj
    ctl.emit(task_view(ctl.call(TaskGet(id=task_id))))


@app.command()
def cancel(
    ctx: typer.Context,
    task_id: str = typer.Argument(..., metavar="ID"),
    reason: str = typer.Option("", "--reason"),
    _json: JsonOption = False,
) -> None:
    """Cancel a task: a queued one never starts, a running one is asked to stop."""
    ctl: Ctl = ctx.obj
    task = ctl.call(TaskCancel(id=task_id, reason=reason))
    ctl.emit(task_view(task) if ctl.json else task_row(task))


@app.command()
def dead(ctx: typer.Context, queue: str = typer.Option("", "--queue"), _json: JsonOption = False) -> None:
    """Tasks out of attempts, with their last error (`tasks requeue ID` runs one again)."""
    ctl: Ctl = ctx.obj
    show_tasks(ctl, all_tasks(ctl, [TaskState.DEAD], queue, ""))


@app.command()
def requeue(
    ctx: typer.Context, task_id: str = typer.Argument(..., metavar="ID"), _json: JsonOption = False
) -> None:
    """Queue a dead, failed or cancelled task again, with a full set of attempts."""
    ctl: Ctl = ctx.obj
    task = ctl.call(TaskRequeue(id=task_id))
    ctl.emit(task_view(task) if ctl.json else task_row(task))


@app.command()
def watch(
    ctx: typer.Context,
    task_id: str = typer.Argument("", metavar="[ID]", help="Only this task; ends when it finishes."),
    _json: JsonOption = False,
) -> None:
    """Follow task events live (Ctrl-C stops)."""
    ctl: Ctl = ctx.obj
    since = ctl.call(BusStats()).last_event_seq
    if task_id and ctl.call(TaskGet(id=task_id)).state in TERMINAL:
        fail(f"task {task_id} has finished: `baaaht-ctl tasks get {task_id}` shows it")
    follow(ctl, task_id, since)


def follow(ctl: Ctl, task_id: str, since: int, quiet: bool = False) -> None:
    """Task events after `since` (of `task_id` only, when given) until that task finishes."""
    try:
        with interruptible(), ctl.client.subscribe(TOPICS, since=since) as events:
            for delivery in events:
                event = delivery.event
                if not isinstance(event, TaskEvent) or (task_id and event.task_id != task_id):
                    continue
                if not quiet:
                    show_event(ctl, delivery.time, event)
                if task_id and event.state in TERMINAL:
                    return
    except BusError as exc:
        ctl.explain(exc)


def show_event(ctl: Ctl, time: float, event: TaskEvent) -> None:
    if ctl.json:
        json_line({"time": time, **msgspec.to_builtins(event)})
        return
    extra = getattr(event, "error", "") or getattr(event, "worker", "") or getattr(event, "reason", "")
    tag = type(event).__struct_config__.tag
    typer.echo(
        f"[{iso_time(time)}] {tag} {event.task_id} {event.queue}/{event.task_type} attempt {event.attempt}"
        + (f": {extra}" if extra else "")
    )


# -- schedules --------------------------------------------------------------------------------------


def schedule_row(schedule: ScheduleInfo) -> dict:
    return {
        "id": schedule.id,
        "when": schedule.cron or f"every {schedule.every:g}s",
        "queue": schedule.queue,
        "type": schedule.task_type,
        "overlap": schedule.overlap,
        "paused": schedule.paused,
        "runs": schedule.runs,
        "next_run_at": iso_time(schedule.next_run_at) if not schedule.paused else None,
        "last_task": schedule.last_task_id,
    }


def show_schedule(ctl: Ctl, schedule: ScheduleInfo) -> None:
    ctl.emit(schedule if ctl.json else schedule_row(schedule))


@schedules_app.command("add")
def schedule_add(
    ctx: typer.Context,
    queue: str = typer.Argument(...),
    task_type: str = typer.Argument(..., metavar="TYPE"),
    body: Optional[str] = typer.Argument(None, metavar="[JSON]", help="The payload of every run, as JSON."),
    cron: str = typer.Option("", "--cron", help="A five-field cron expression, in UTC."),
    every: Optional[str] = typer.Option(None, "--every", help="An interval, e.g. 30s."),
    overlap: str = typer.Option("skip", "--overlap", help="skip, buffer_one or allow."),
    catch_up: Optional[str] = typer.Option(None, "--catch-up", help="Make up one run missed this recently."),
    priority: int = typer.Option(0, "--priority"),
    session: str = typer.Option("", "--session"),
    _json: JsonOption = False,
) -> None:
    """A recurring task, by cron expression or interval."""
    ctl: Ctl = ctx.obj
    if overlap not in ("skip", "buffer_one", "allow"):
        fail(f"--overlap {overlap!r}: expected skip, buffer_one or allow")
    request = TaskScheduleAdd(
        queue=queue,
        task_type=task_type,
        payload=to_payload(body),
        cron=cron,
        every=seconds("--every", every),
        overlap=overlap,
        catch_up_window=60.0 if catch_up is None else seconds("--catch-up", catch_up),
        priority=priority,
        session_id=session,
    )
    show_schedule(ctl, ctl.call(request))


@schedules_app.command("list")
def schedule_list(
    ctx: typer.Context, session: str = typer.Option("", "--session"), _json: JsonOption = False
) -> None:
    ctl: Ctl = ctx.obj
    found = ctl.call(TaskScheduleList(session_id=session)).schedules
    ctl.emit(found if ctl.json else [schedule_row(s) for s in found])


@schedules_app.command("rm")
def schedule_rm(ctx: typer.Context, schedule_id: str = typer.Argument(..., metavar="ID")) -> None:
    ctl: Ctl = ctx.obj
    ctl.call(TaskScheduleRemove(id=schedule_id))
    typer.echo(f"schedule {schedule_id} removed", err=True)


def _schedule_switch(name: str, request_type: type[TaskSchedulePause | TaskScheduleResume]) -> None:
    """`schedules pause ID` and `schedules resume ID`: the same command with another request."""

    @schedules_app.command(name, help=request_type.__doc__)
    def switch(
        ctx: typer.Context, schedule_id: str = typer.Argument(..., metavar="ID"), _json: JsonOption = False
    ) -> None:
        ctl: Ctl = ctx.obj
        show_schedule(ctl, ctl.call(request_type(id=schedule_id)))


_schedule_switch("pause", TaskSchedulePause)
_schedule_switch("resume", TaskScheduleResume)


@workers_app.command("list")
def workers_list(ctx: typer.Context, _json: JsonOption = False) -> None:
    """Workers taking work: their queues, slots, slots in use and when they were last heard from."""
    ctl: Ctl = ctx.obj
    workers = ctl.call(TaskWorkers()).workers
    if ctl.json:
        ctl.emit(workers)
        return
    rows = [
        {
            "worker": w.worker_id,
            "queues": ",".join(w.queues),
            "slots": w.slots,
            "in_use": w.in_use,
            "connected": w.connected,
            "session": w.session_id,
            "last_seen": iso_time(w.last_seen),
        }
        for w in workers
    ]
    ctl.emit(rows)
