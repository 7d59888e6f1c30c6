"""`baaaht-ctl tools list` and `tools run SESSION TOOL ...`: the worker's tools, called as a session.

    baaaht-ctl tools run S exec -- ls -la              stdout/stderr live; exit code = the program's
    baaaht-ctl tools run S read_file notes.txt -a start_line=2
    echo hi | baaaht-ctl tools run S write_file notes.txt --from-stdin

A call is a task on the scheduler's `tools` queue in the session (schemas/tools.py); the session's
worker is started for it if none runs. Positional arguments fill the tool's leading fields (exec: the
whole argv), `-a FIELD=VALUE` any field (VALUE read as JSON when it is JSON, else as text), and
`--from-stdin` the tool's text input (write_file content, edit_file new, exec stdin, fetch body).
Streamed exec output follows the task's `task.progress` events, subscribed before the submit (from the
bus's event history), so not even the first chunk of a call a warm worker finishes at once is missed.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Optional

import msgspec
import orjson
import typer

from baaaht.bus.errors import BusError
from baaaht.ctl.common import Ctl, JsonOption, fail, interruptible, json_line
from baaaht.schemas.base import SESSION_SEPARATOR, topic_of
from baaaht.schemas.bus import BusStats
from baaaht.schemas.tasks import (
    TERMINAL,
    RetryPolicy,
    TaskCancelled,
    TaskDead,
    TaskFailed,
    TaskGet,
    TaskInfo,
    TaskProgressed,
    TaskRetrying,
    TaskState,
    TaskSubmit,
    TaskSucceeded,
)
from baaaht.schemas.tools import (
    OUTPUT_DECODER,
    TOOLS,
    TOOLS_QUEUE,
    AnyToolCall,
    ToolExecChunk,
    ToolExecResult,
    ToolOutput,
    tool_name,
    tool_schemas,
)

app = typer.Typer(no_args_is_help=True, add_completion=False)

TOOL_NAMES = [tool_name(call) for call in TOOLS]
# The fields positional arguments fill, per tool; exec takes them all as its argv.
POSITIONAL = {
    "read_file": ["path"],
    "write_file": ["path"],
    "edit_file": ["path"],
    "list_dir": ["path"],
    "glob": ["pattern", "path"],
    "grep": ["pattern", "path"],
    "fetch": ["url"],
}
STDIN_FIELD = {"write_file": "content", "edit_file": "new", "exec": "stdin", "fetch": "body"}
EVENTS = [TaskProgressed, TaskRetrying, TaskSucceeded, TaskFailed, TaskCancelled, TaskDead]
WORKER_START = 120.0  # seconds a call may wait for its worker to start and take it
EXIT_FAILED = 1


def field_value(text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text


def build_call(tool: str, args: list[str], fields: list[str], stdin: str | None) -> Any:
    """The typed call from the command line; a bad one fails naming the field."""
    if tool not in TOOL_NAMES:
        fail(f"no tool {tool!r}: one of {', '.join(TOOL_NAMES)} (`baaaht-ctl tools list`)")
    body: dict[str, Any] = {"tool": tool}
    if tool == "exec":
        body["argv"] = args
    else:
        names = POSITIONAL[tool]
        if len(args) > len(names):
            fail(f"{tool} takes at most {len(names)} argument(s) ({' '.join(names).upper()}): got {args}")
        body.update(zip(names, args, strict=False))
    for pair in fields:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            fail(f"-a {pair!r}: expected FIELD=VALUE, e.g. -a start_line=2")
        body[name] = field_value(value)
    if stdin is not None:
        body[STDIN_FIELD[tool]] = stdin
    try:
        return msgspec.convert(body, AnyToolCall)
    except msgspec.ValidationError as error:
        fail(f"{tool}: {error}")


def run_timeout(call: Any) -> float:
    """How long to wait for the call's end: its own limits (exec), plus the worker's start."""
    extra = getattr(call, "timeout", 0.0) + getattr(call, "kill_after", 0.0)
    return WORKER_START + extra


@app.command("list")
def list_tools(ctx: typer.Context, _json: JsonOption = False) -> None:
    """The tools a session's worker runs; --json: their LLM tool definitions (JSON Schema input)."""
    ctl: Ctl = ctx.obj
    schemas = tool_schemas()
    if ctl.json:
        ctl.emit(schemas)
        return
    rows = [
        {
            "tool": s["name"],
            "required": " ".join(s["input_schema"].get("required", [])),
            "about": s["description"],
        }
        for s in schemas
    ]
    ctl.emit(rows, ["tool", "required", "about"])


@app.command(context_settings={"allow_interspersed_args": True})
def run(
    ctx: typer.Context,
    session: str = typer.Argument(..., metavar="SESSION", help="The session whose worker runs the tool."),
    tool: str = typer.Argument(..., metavar="TOOL", help=f"One of {', '.join(TOOL_NAMES)}."),
    args: Optional[list[str]] = typer.Argument(None, metavar="[ARGS]...", help="exec: the argv, after --."),
    fields: Optional[list[str]] = typer.Option(None, "--arg", "-a", help="FIELD=VALUE of the call."),
    from_stdin: bool = typer.Option(False, "--from-stdin", help="The tool's text input from stdin."),
    _json: JsonOption = False,
) -> None:
    """Run a tool in a session; exit code: exec's (128+N when killed by signal N), 1 when the call failed."""
    ctl: Ctl = ctx.obj
    stdin = sys.stdin.read() if from_stdin else None
    if from_stdin and tool not in STDIN_FIELD:
        fail(f"{tool} takes no text input: --from-stdin is for {', '.join(STDIN_FIELD)}")
    call = build_call(tool, args or [], fields or [], stdin)
    topics = [f"{topic_of(event)}{SESSION_SEPARATOR}{session}" for event in EVENTS]
    since = ctl.call(BusStats()).last_event_seq  # the call's events from here on are all seen
    request = TaskSubmit(
        queue=TOOLS_QUEUE,
        task_type=tool,
        payload=msgspec.msgpack.encode(call),
        session_id=session,
        retry=RetryPolicy(maximum_attempts=1),  # a tool call is not run twice behind the operator's back
    )
    task = ctl.call(request).task
    try:
        with interruptible(), ctl.client.subscribe(topics, since=since) as events:
            task = follow(ctl, events, task, run_timeout(call))
    except BusError as error:
        ctl.explain(error)
    if task is None:
        return  # interrupted
    raise typer.Exit(show_outcome(ctl, task))


def follow(ctl: Ctl, events, task: TaskInfo, timeout: float) -> TaskInfo:
    """Print the task's streamed output until it finishes; the finished task."""
    deadline = time.monotonic() + timeout
    seen: set[tuple[int, int]] = set()
    while task.state not in TERMINAL:
        delivery = events.next(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
        if delivery is None:
            if time.monotonic() >= deadline:
                fail(f"task {task.id} did not finish within {timeout:g}s (`baaaht-ctl tasks get {task.id}`)")
            task = ctl.call(TaskGet(id=task.id))  # a finish whose event was not kept
            continue
        event = delivery.event
        if getattr(event, "task_id", "") != task.id:
            continue
        if isinstance(event, TaskProgressed):
            if (event.attempt, event.seq) not in seen:
                seen.add((event.attempt, event.seq))
                show_chunk(ctl, event.data)
        elif isinstance(event, TaskRetrying):
            typer.echo(f"attempt {event.attempt} failed ({event.error_type}): {event.error}", err=True)
        else:
            task = ctl.call(TaskGet(id=task.id))
    return task


def show_chunk(ctl: Ctl, data: bytes) -> None:
    chunk = OUTPUT_DECODER.decode(data)
    if ctl.json:
        json_line(chunk)
        return
    if isinstance(chunk, ToolExecChunk):
        out = sys.stdout if chunk.stream == "stdout" else sys.stderr
        out.write(chunk.data)
        out.flush()


def show_outcome(ctl: Ctl, task: TaskInfo) -> int:
    """Print the result (or the error); the exit code."""
    if task.state is not TaskState.SUCCEEDED:
        if ctl.json:
            json_line({"state": task.state.value, "error_type": task.error_type, "error": task.error})
        else:
            typer.echo(f"error {task.error_type or task.state.value}: {task.error}", err=True)
        return EXIT_FAILED
    result: ToolOutput = OUTPUT_DECODER.decode(task.result)
    if ctl.json:
        json_line(result)
    else:
        show_result(ctl, result)
    if isinstance(result, ToolExecResult):
        return result.exit_code if result.exit_code >= 0 else 128 - result.exit_code
    return 0


def show_result(ctl: Ctl, result: ToolOutput) -> None:
    plain = msgspec.to_builtins(result)
    plain.pop("type", None)
    if "content" in plain:  # read_file: the text as it is, the rest on stderr
        sys.stdout.write(plain.pop("content"))
        typer.echo(" ".join(f"{key}={value}" for key, value in plain.items()), err=True)
    elif "body" in plain:  # fetch
        sys.stdout.write(plain.pop("body"))
        typer.echo(f"status {plain['status']}" + (" (truncated)" if plain.get("truncated") else ""), err=True)
    elif "entries" in plain:  # list_dir
        ctl.emit(plain["entries"], ["name", "kind", "size"])
    elif "matches" in plain and plain["matches"] and isinstance(plain["matches"][0], dict):  # grep
        for match in plain["matches"]:
            typer.echo(f"{match['path']}:{match['line']}:{match['text']}")
    elif "matches" in plain:  # glob
        for path in plain["matches"]:
            typer.echo(path)
    elif isinstance(result, ToolExecResult):
        if result.timed_out or result.stdout_truncated or result.stderr_truncated:
            typer.echo(
                f"exit {result.exit_code}"
                + (" (timed out)" if result.timed_out else "")
                + (" (output truncated)" if result.stdout_truncated or result.stderr_truncated else ""),
                err=True,
            )
    else:
        ctl.emit(plain)
