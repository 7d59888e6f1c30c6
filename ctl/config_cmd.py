"""`baaaht-ctl config show`: the configuration a host runs with, and where each value came from.

The host's launcher writes its effective config (and the source of every value: default,
file, environment variable or flag) into the run directory. This command finds the run
directory from baaaht-ctl's own configuration (`--config`, ORCHESTRATOR_ variables) and
shows what is there; before any host has started there, it shows the configuration as
resolved for baaaht-ctl itself, and says so.
"""

from __future__ import annotations

from pathlib import Path

import typer

from baaaht.common.config import EFFECTIVE_CONFIG_NAME, dump_config, dump_flat, read_effective_sources
from baaaht.ctl.common import Ctl, JsonOption
from baaaht.schemas.config import Config

app = typer.Typer(no_args_is_help=True, add_completion=False)


def effective_config(ctl: Ctl) -> tuple[Config, dict[str, str], str]:
    """The config, the source of each dotted key, and what it was read from."""
    host_file = Path(ctl.config.bus.run_dir) / EFFECTIVE_CONFIG_NAME
    if not host_file.exists():
        return ctl.config, ctl.sources, "resolved here: no host has written its config to this run directory"
    # The host's children see no ORCHESTRATOR_ variables: neither does this reading of it.
    host_config, file_sources = ctl.load(str(host_file), env={})
    host_sources = read_effective_sources(host_file.parent) or {}
    return (
        host_config,
        {key: host_sources.get(key, source) for key, source in file_sources.items()},
        str(host_file),
    )


@app.command()
def show(ctx: typer.Context, _json: JsonOption = False) -> None:
    """The effective configuration, key by key, with where each value came from."""
    ctl: Ctl = ctx.obj
    config, sources, origin = effective_config(ctl)
    if ctl.json:
        ctl.emit({"origin": origin, "config": dump_config(config), "sources": sources})
        return
    typer.echo(f"# {origin}", err=True)
    ctl.emit(
        [{"key": key, "value": value, "source": sources[key]} for key, value in dump_flat(config).items()]
    )
