"""`baaaht-ctl pool ...`: the warm pool of worker containers, through the container manager."""

from __future__ import annotations

import time

import typer

from baaaht.ctl.common import Ctl, JsonOption
from baaaht.schemas.containers import ContainerPoolResize, ContainerPoolStatus, PoolSlot, PoolStatus

app = typer.Typer(no_args_is_help=True, add_completion=False)

COLUMNS = ["slot", "container", "state", "age", "session"]


def slot_row(slot: PoolSlot, now: float) -> dict:
    return {
        "slot": slot.slot or "-",
        "container": slot.container_id[:12],
        "state": slot.state,
        "age": f"{max(0.0, now - slot.created):.0f}s",
        "session": slot.session_id or "-",
    }


def render(ctl: Ctl, status: PoolStatus) -> None:
    if ctl.json:
        ctl.emit(status)
        return
    ready = sum(1 for slot in status.slots if slot.state == "ready")
    typer.echo(f"pool size {status.size} (max {status.max}), {ready} ready", err=True)
    if status.problem:
        typer.echo(f"problem: {status.problem}", err=True)
    now = time.time()
    ctl.emit([slot_row(slot, now) for slot in status.slots], COLUMNS)


@app.command()
def status(ctx: typer.Context, _json: JsonOption = False) -> None:
    """The pool's containers: ready (unclaimed), starting, claimed (a session's from then on), ended."""
    render(ctx.obj, ctx.obj.call(ContainerPoolStatus()))


@app.command()
def resize(
    ctx: typer.Context,
    size: int = typer.Argument(..., min=0, help="Unclaimed containers to keep ready (at most pool.max)."),
    _json: JsonOption = False,
) -> None:
    """Keep SIZE containers ready from now on (the operator only; pool.size is the default again after a
    restart of the container manager). A smaller pool removes unclaimed containers, never claimed ones."""
    render(ctx.obj, ctx.obj.call(ContainerPoolResize(size=size)))
