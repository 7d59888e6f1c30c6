"""`baaaht-ctl containers ...`: the containers of this installation, through the container manager.

`run`, `create`, `start`, `restart`, `kill`, `wait` and `exec` take docker's shape:
`baaaht-ctl containers run --session S [--rm] [-d] [-e K=V] [--memory 256MB] [--cpus 0.5] IMAGE -- CMD...`.
"""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import msgspec
import typer

from baaaht.common.units import parse_size
from baaaht.ctl.common import (
    Ctl,
    JsonOption,
    fail,
    interruptible,
    iso_time,
    json_line,
    key_values,
    option_value,
    table_rows,
)
from baaaht.schemas.containers import (
    ContainerCreate,
    ContainerDestroy,
    ContainerExec,
    ContainerGet,
    ContainerKill,
    ContainerList,
    ContainerLogs,
    ContainerRestart,
    ContainerSpec,
    ContainerStart,
    ContainerStats,
    ContainerStatsStream,
    ContainerStop,
    ContainerWait,
    CreateResult,
    Resources,
    StatsSample,
)

app = typer.Typer(no_args_is_help=True, add_completion=False)

# A follower or a wait lasts until Ctrl-C or the container's end; the bus still wants a deadline.
FOLLOW_TIMEOUT = 7 * 24 * 3600.0
# The engine needs a second or two for one stats sample.
STATS_TIMEOUT = 30.0
LIST_COLUMNS = ["id", "name", "state", "session_id", "role", "image", "status", "created"]
STATS_COLUMNS = ["time", "cpu_percent", "memory_usage", "memory_limit", "pids", "net_rx", "net_tx"]

ContainerArg = Annotated[str, typer.Argument(help="Id, id prefix or name.")]
GraceOption = Annotated[float, typer.Option("--timeout", "-t", help="Seconds between SIGTERM and SIGKILL.")]


def done(ctl: Ctl, action: str, container: str, **result) -> None:
    """What a command without a result of its own did: a result object with --json, a note otherwise."""
    if ctl.json:
        ctl.emit({"id": container, action: True, **result})
    else:
        typer.echo(f"{action} {container}", err=True)


def with_grace(ctl: Ctl, request: ContainerStop | ContainerRestart, action: str) -> None:
    """Stop and restart: the call may take the grace period on top of the usual wait."""
    ctl.call(request, timeout=ctl.timeout + request.timeout)
    done(ctl, action, request.id)


@app.command("list")
def list_containers(
    ctx: typer.Context,
    session: str = typer.Option("", "--session", "-s", help="Only this session's containers."),
    states: list[str] = typer.Option(
        [], "--state", help="Only in this state (repeatable): running, exited..."
    ),
    label: list[str] = typer.Option([], "--label", "-l", help="Only with this KEY=VALUE label (repeatable)."),
    _json: JsonOption = False,
) -> None:
    """Containers of this installation."""
    ctl: Ctl = ctx.obj
    query = ContainerList(session_id=session, labels=key_values("--label", label), states=states)
    found = ctl.call(query).containers
    if ctl.json:
        ctl.emit(found)
        return
    ctl.emit(
        [{**msgspec.structs.asdict(c), "id": c.id[:12], "created": iso_time(c.created)} for c in found],
        LIST_COLUMNS,
    )


@app.command()
def get(ctx: typer.Context, container: ContainerArg, _json: JsonOption = False) -> None:
    """Everything known about one container."""
    ctx.obj.emit(ctx.obj.call(ContainerGet(id=container)))


# -- making and running containers -------------------------------------------------------------------


def memory_bytes(text: Optional[str]) -> int:
    return 0 if text is None else int(option_value("--memory", text, parse_size))


def create_container(
    ctl: Ctl,
    session: str,
    image: str,
    command: list[str],
    *,
    name: str,
    env: list[str],
    label: list[str],
    memory: Optional[str],
    cpus: float,
    role: str,
    remove_on_stop: bool = False,
) -> CreateResult:
    spec = ContainerSpec(
        image=image,
        name=name,
        command=command,
        env=key_values("--env", env),
        labels=key_values("--label", label),
        resources=Resources(cpus=cpus, memory=memory_bytes(memory)),
        remove_on_stop=remove_on_stop,
    )
    created = ctl.call(ContainerCreate(spec=spec, session_id=session, role=role))
    for warning in created.warnings:
        typer.echo(f"warning: {warning}", err=True)
    return created


SessionOption = Annotated[str, typer.Option("--session", "-s", help="The session the container is for.")]
ImageArg = Annotated[str, typer.Argument(help="A local image, e.g. the one `make image` prints.")]
CommandArg = Annotated[
    Optional[list[str]], typer.Argument(help="The command and its arguments, after `--`.", show_default=False)
]
NameOption = Annotated[str, typer.Option("--name", help="The container's name (default: the engine's).")]
EnvOption = Annotated[
    list[str], typer.Option("--env", "-e", help="KEY=VALUE in its environment (repeatable).")
]
LabelOption = Annotated[list[str], typer.Option("--label", "-l", help="KEY=VALUE label (repeatable).")]
MemoryOption = Annotated[Optional[str], typer.Option("--memory", "-m", help="Memory limit, e.g. 256MB.")]
CpusOption = Annotated[float, typer.Option("--cpus", min=0, help="CPUs, e.g. 0.5 (0: the policy's default).")]
RoleOption = Annotated[str, typer.Option("--role", help="The container's role.")]


@app.command()
def create(
    ctx: typer.Context,
    session: SessionOption,
    image: ImageArg,
    command: CommandArg = None,
    name: NameOption = "",
    env: EnvOption = [],  # noqa: B006 - Typer reads the default, never mutates it
    label: LabelOption = [],  # noqa: B006
    memory: MemoryOption = None,
    cpus: CpusOption = 0.0,
    role: RoleOption = "agent",
    _json: JsonOption = False,
) -> None:
    """Create (not start) a container for a session: `create -s S IMAGE -- CMD...`. Prints its id."""
    ctl: Ctl = ctx.obj
    created = create_container(
        ctl,
        session,
        image,
        command or [],
        name=name,
        env=env,
        label=label,
        memory=memory,
        cpus=cpus,
        role=role,
    )
    ctl.emit(created) if ctl.json else typer.echo(created.id)


@app.command()
def run(
    ctx: typer.Context,
    session: SessionOption,
    image: ImageArg,
    command: CommandArg = None,
    detach: bool = typer.Option(False, "--detach", "-d", help="Print the id and leave it running."),
    rm: bool = typer.Option(False, "--rm", help="Remove it once it has exited."),
    name: NameOption = "",
    env: EnvOption = [],  # noqa: B006
    label: LabelOption = [],  # noqa: B006
    memory: MemoryOption = None,
    cpus: CpusOption = 0.0,
    role: RoleOption = "agent",
    _json: JsonOption = False,
) -> None:
    """Create and start a container; without -d, print its output and exit with its exit code."""
    ctl: Ctl = ctx.obj
    # Detached, only the engine is there to remove it when it ends; attached, we remove it after wait.
    created = create_container(
        ctl,
        session,
        image,
        command or [],
        name=name,
        env=env,
        label=label,
        memory=memory,
        cpus=cpus,
        role=role,
        remove_on_stop=rm and detach,
    )
    ctl.call(ContainerStart(id=created.id))
    if detach:
        ctl.emit(created) if ctl.json else typer.echo(created.id)
        return
    result = None
    with interruptible():  # Ctrl-C leaves the container running, as it does to a detached one
        print_logs(ctl, ContainerLogs(id=created.id, follow=True), FOLLOW_TIMEOUT)
        result = ctl.call(ContainerWait(id=created.id), timeout=FOLLOW_TIMEOUT)
    if result is None:
        typer.echo(f"{created.id} keeps running: `baaaht-ctl containers stop` ends it", err=True)
        return
    if rm:
        ctl.call(ContainerDestroy(id=created.id, force=True))
    if ctl.json:
        ctl.emit({"id": created.id, "exit_code": result.exit_code, "error": result.error, "removed": rm})
    raise typer.Exit(result.exit_code)


@app.command()
def start(ctx: typer.Context, container: ContainerArg, _json: JsonOption = False) -> None:
    """Start a created or stopped container."""
    ctx.obj.call(ContainerStart(id=container))
    done(ctx.obj, "started", container)


@app.command()
def restart(
    ctx: typer.Context,
    container: ContainerArg,
    timeout: GraceOption = 10.0,
    _json: JsonOption = False,
) -> None:
    """Stop (SIGTERM, SIGKILL after --timeout) and start again."""
    with_grace(ctx.obj, ContainerRestart(id=container, timeout=timeout), "restarted")


@app.command()
def kill(
    ctx: typer.Context,
    container: ContainerArg,
    signal: str = typer.Option("SIGKILL", "--signal", "-s", help="The signal, e.g. SIGTERM or 15."),
    _json: JsonOption = False,
) -> None:
    """Send a signal to a running container (SIGKILL by default)."""
    ctx.obj.call(ContainerKill(id=container, signal=signal))
    done(ctx.obj, "killed", container, signal=signal)


@app.command()
def wait(ctx: typer.Context, container: ContainerArg, _json: JsonOption = False) -> None:
    """Block until the container stops; print its exit code (Ctrl-C ends the wait)."""
    ctl: Ctl = ctx.obj
    try:
        result = ctl.call(ContainerWait(id=container), timeout=FOLLOW_TIMEOUT)
    except KeyboardInterrupt:
        fail("interrupted")
    ctl.emit(result) if ctl.json else typer.echo(result.exit_code)


@app.command("exec")
def exec_command(
    ctx: typer.Context,
    container: ContainerArg,
    command: Annotated[list[str], typer.Argument(help="The command and its arguments (after `--`).")],
    env: EnvOption = [],  # noqa: B006
    workdir: str = typer.Option("", "--workdir", "-w", help="Working directory inside the container."),
    _json: JsonOption = False,
) -> None:
    """Run a command in a running container, as the container's user; exit with its exit code."""
    ctl: Ctl = ctx.obj
    request = ContainerExec(id=container, command=command, env=key_values("--env", env), working_dir=workdir)
    result = ctl.call(request, timeout=max(ctl.timeout, STATS_TIMEOUT))
    if ctl.json:
        ctl.emit(result)
    else:
        sys.stdout.write(result.stdout)
        sys.stderr.write(result.stderr)
        if result.truncated:
            typer.echo("(output truncated)", err=True)
    raise typer.Exit(result.exit_code)


# -- output and resource use ---------------------------------------------------------------------


def print_logs(ctl: Ctl, request: ContainerLogs, timeout: float | None) -> None:
    for chunk in ctl.stream(request, timeout=timeout):
        for line in chunk.lines:
            if ctl.json:
                json_line(msgspec.structs.asdict(line))
                continue
            out = sys.stderr if line.stream == "stderr" else sys.stdout
            out.write((f"{iso_time(line.time)} " if line.time else "") + line.text + "\n")
        sys.stdout.flush()


@app.command()
def logs(
    ctx: typer.Context,
    container: ContainerArg,
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new lines (Ctrl-C ends)."),
    tail: int = typer.Option(-1, "--tail", "-n", help="Only the last N lines (-1: all)."),
    timestamps: bool = typer.Option(False, "--timestamps", "-t", help="Show the engine's timestamps."),
    _json: JsonOption = False,
) -> None:
    """The container's output; stderr lines go to stderr (one JSON object per line with --json)."""
    request = ContainerLogs(id=container, follow=follow, tail=tail, timestamps=timestamps)
    with interruptible():
        print_logs(ctx.obj, request, FOLLOW_TIMEOUT if follow else None)


@app.command()
def stats(
    ctx: typer.Context,
    container: ContainerArg,
    stream: bool = typer.Option(False, "--stream", help="A sample every --interval until Ctrl-C."),
    interval: float = typer.Option(
        1.0, "--interval", help="Seconds between samples with --stream (at least 1: the engine's rate)."
    ),
    _json: JsonOption = False,
) -> None:
    """CPU, memory, network, block I/O and pids of a running container."""
    ctl: Ctl = ctx.obj
    if not stream:
        ctl.emit(ctl.call(ContainerStats(id=container), timeout=STATS_TIMEOUT))
        return
    request = ContainerStatsStream(id=container, interval=interval)
    with interruptible():
        for index, sample in enumerate(ctl.stream(request, timeout=FOLLOW_TIMEOUT)):
            if ctl.json:
                json_line(sample)
            else:
                typer.echo(table_rows([stats_row(sample)], STATS_COLUMNS, header=index == 0))
                sys.stdout.flush()


def stats_row(sample: StatsSample) -> dict:
    return {**msgspec.structs.asdict(sample), "time": iso_time(sample.time)}


# -- ending containers ---------------------------------------------------------------------------


@app.command()
def stop(
    ctx: typer.Context,
    container: ContainerArg,
    timeout: GraceOption = 10.0,
    _json: JsonOption = False,
) -> None:
    """Stop a container (SIGTERM, then SIGKILL after --timeout)."""
    with_grace(ctx.obj, ContainerStop(id=container, timeout=timeout), "stopped")


@app.command()
def rm(
    ctx: typer.Context,
    container: ContainerArg,
    force: bool = typer.Option(False, "--force", "-f", help="Kill it first if it is running."),
    volumes: bool = typer.Option(False, "--volumes", "-v", help="Remove its anonymous volumes too."),
    _json: JsonOption = False,
) -> None:
    """Remove a container."""
    ctx.obj.call(ContainerDestroy(id=container, force=force, remove_volumes=volumes))
    done(ctx.obj, "removed", container)
