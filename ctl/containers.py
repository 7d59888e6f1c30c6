"""`baaaht-ctl containers ...`: the containers of this installation, through the container manager."""

from __future__ import annotations

import sys
import time

import orjson
import typer

from baaaht.ctl import common
from baaaht.ctl.common import call, emit, fail, state
from baaaht.schemas.containers import (
    ContainerDestroy,
    ContainerGet,
    ContainerListQuery,
    ContainerLogs,
    ContainerStats,
    ContainerStatsStream,
    ContainerStop,
    StatsSample,
)

app = typer.Typer(no_args_is_help=True, add_completion=False)

# A follower lasts until Ctrl-C or the container's end; the bus still wants a deadline.
FOLLOW_TIMEOUT = 7 * 24 * 3600.0
# The engine needs a second or two for one stats sample.
STATS_TIMEOUT = 30.0
LIST_COLUMNS = ["id", "name", "state", "session_id", "role", "image", "status"]
STATS_COLUMNS = ["time", "cpu_percent", "memory_usage", "memory_limit", "pids", "net_rx", "net_tx"]


def parse_labels(labels: list[str]) -> dict[str, str]:
    parsed = {}
    for label in labels:
        key, sep, value = label.partition("=")
        if not sep or not key:
            fail(f"--label wants KEY=VALUE, not {label!r}")
        parsed[key] = value
    return parsed


@app.command("list")
def list_containers(
    session: str = typer.Option("", "--session", "-s", help="Only this session's containers."),
    states: list[str] = typer.Option(
        [], "--state", help="Only in this state (repeatable): running, exited..."
    ),
    label: list[str] = typer.Option([], "--label", "-l", help="Only with this KEY=VALUE label (repeatable)."),
) -> None:
    """Containers of this installation."""
    found = call(ContainerListQuery(session_id=session, labels=parse_labels(label), states=states)).containers
    if state.json:
        emit(found)
        return
    rows = [{**common.to_builtins(c), "id": c.id[:12]} for c in found]
    emit(rows, LIST_COLUMNS)


@app.command()
def get(container: str = typer.Argument(..., help="Id, id prefix or name.")) -> None:
    """Everything known about one container."""
    emit(call(ContainerGet(id=container)))


@app.command()
def logs(
    container: str = typer.Argument(..., help="Id, id prefix or name."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new lines (Ctrl-C ends)."),
    tail: int = typer.Option(-1, "--tail", "-n", help="Only the last N lines (-1: all)."),
    timestamps: bool = typer.Option(False, "--timestamps", "-t", help="Show the engine's timestamps."),
) -> None:
    """The container's output; stderr lines go to stderr."""
    request = ContainerLogs(id=container, follow=follow, tail=tail, timestamps=timestamps)
    for chunk in common.stream(request, timeout=FOLLOW_TIMEOUT if follow else None):
        for line in chunk.lines:
            if state.json:
                sys.stdout.write(orjson.dumps(common.to_builtins(line)).decode() + "\n")
                continue
            out = sys.stderr if line.stream == "stderr" else sys.stdout
            out.write((f"{line.time} " if line.time else "") + line.text + "\n")
        sys.stdout.flush()


def stats_row(sample: StatsSample) -> dict:
    row = common.to_builtins(sample)
    row["time"] = time.strftime("%H:%M:%S", time.localtime(sample.time))
    return row


@app.command()
def stats(
    container: str = typer.Argument(..., help="Id, id prefix or name."),
    stream: bool = typer.Option(False, "--stream", help="A sample every --interval until Ctrl-C."),
    interval: float = typer.Option(1.0, "--interval", help="Seconds between samples with --stream."),
) -> None:
    """CPU, memory, network, block I/O and pids of a running container."""
    if not stream:
        emit(call(ContainerStats(id=container), timeout=STATS_TIMEOUT))
        return
    request = ContainerStatsStream(id=container, interval=interval)
    for index, sample in enumerate(common.stream(request, timeout=FOLLOW_TIMEOUT)):
        if state.json:
            sys.stdout.write(orjson.dumps(common.to_builtins(sample)).decode() + "\n")
        else:
            lines = common.table([stats_row(sample)], STATS_COLUMNS).splitlines()
            typer.echo("\n".join(lines if index == 0 else lines[1:]))  # the header once
        sys.stdout.flush()


@app.command()
def stop(
    container: str = typer.Argument(..., help="Id, id prefix or name."),
    timeout: float = typer.Option(10.0, "--timeout", help="Seconds between SIGTERM and SIGKILL."),
) -> None:
    """Stop a container (SIGTERM, then SIGKILL after --timeout)."""
    call(ContainerStop(id=container, timeout=timeout), timeout=state.timeout + timeout)
    typer.echo(f"stopped {container}", err=True)


@app.command()
def rm(
    container: str = typer.Argument(..., help="Id, id prefix or name."),
    force: bool = typer.Option(False, "--force", "-f", help="Kill it first if it is running."),
    volumes: bool = typer.Option(False, "--volumes", "-v", help="Remove its anonymous volumes too."),
) -> None:
    """Remove a container."""
    call(ContainerDestroy(id=container, force=force, remove_volumes=volumes))
    typer.echo(f"removed {container}", err=True)
