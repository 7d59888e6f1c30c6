"""baaaht-ctl agents: the agent socket's peers, and killing an agent's container."""

from __future__ import annotations

from typing import Annotated

import typer

from baaaht.ctl.common import Ctl, JsonOption, fail, iso_time
from baaaht.schemas.bus import AgentInfo, BusAgentsList
from baaaht.schemas.containers import ContainerKill

app = typer.Typer(no_args_is_help=True)

COLUMNS = ["container", "session", "role", "connected_since", "last_seen", "in_flight", "pid"]


def agent_row(agent: AgentInfo) -> dict:
    return {
        "container": agent.container[:12] or "-",
        "session": agent.session or "-",
        "role": agent.role,
        "connected_since": iso_time(agent.connected_since),
        "last_seen": f"{agent.last_seen_age:.1f}s ago",
        "in_flight": agent.in_flight,
        "pid": agent.pid,
    }


@app.command("list")
def list_agents(ctx: typer.Context, _json: JsonOption = False) -> None:
    """Peers on the agent socket: container, session, role, connected since, last seen, calls in flight."""
    ctl: Ctl = ctx.obj
    agents = ctl.call(BusAgentsList()).agents
    ctl.emit(agents if ctl.json else [agent_row(a) for a in agents], None if ctl.json else COLUMNS)


@app.command()
def kill(
    ctx: typer.Context,
    container: Annotated[str, typer.Argument(help="The agent's container: its id or a unique prefix of it.")],
    _json: JsonOption = False,
) -> None:
    """Kill the agent's container (container.kill, SIGKILL). The container manager then removes its
    identity and the broker revokes it: its connections are refused and closed at once."""
    ctl: Ctl = ctx.obj
    known = {a.container for a in ctl.call(BusAgentsList()).agents if a.container}
    matching = sorted(c for c in known if c.startswith(container))
    if len(matching) != 1:
        fail(
            f"no connected agent's container starts with {container!r}"
            if not matching
            else f"{container!r} names {len(matching)} agents' containers: give more of the id"
        )
    ctl.call(ContainerKill(id=matching[0]))
    if ctl.json:
        ctl.emit({"id": matching[0], "killed": True})
    else:
        typer.echo(f"killed {matching[0]}", err=True)
