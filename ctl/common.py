"""What every baaaht-ctl command shares: the bus connection, output and errors.

Commands are thin: build a request, `call` it, `emit` the result. Data goes to
stdout (a table for people, JSON with `--json`); messages go to stderr.
"""

from __future__ import annotations

import datetime
import sys
from typing import Any, Iterable, Iterator

import msgspec
import orjson
import typer

from baaaht.bus.client import BusClient
from baaaht.bus.errors import BusError
from baaaht.bus.protocol import is_broker_unreachable
from baaaht.common.config import ConfigError, load_config
from baaaht.schemas.base import Request
from baaaht.schemas.bus import Ping
from baaaht.schemas.config import Config

EXIT_ERROR = 1
EXIT_UNREACHABLE = 2


class State:
    json: bool = False
    timeout: float = 5.0
    config_path: str | None = None
    _config: Config | None = None
    _client: BusClient | None = None

    @property
    def config(self) -> Config:
        if self._config is None:
            try:
                self._config, _sources = load_config(self.config_path)
            except ConfigError as exc:
                fail(f"bad configuration: {exc}")
        return self._config

    @property
    def client(self) -> BusClient:
        if self._client is None:
            self._client = BusClient.for_config(self.config, timeout=self.timeout)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


state = State()


def fail(message: str, code: int = EXIT_ERROR) -> None:
    typer.echo(message, err=True)
    raise typer.Exit(code)


def explain(error: BusError) -> None:
    """Print a bus error for people and exit non-zero."""
    if is_broker_unreachable(error):
        fail(
            f"{error.message} within {state.timeout:g}s: is the host running (baaaht-orchestrator)?",
            EXIT_UNREACHABLE,
        )
    details = f" {orjson.dumps(error.details).decode()}" if error.details else ""
    fail(f"error {error.code.value}: {error.message}{details}")


def call(request: Request, timeout: float | None = None) -> Any:
    try:
        return state.client.call(request, timeout=timeout)
    except BusError as exc:
        explain(exc)


def stream(request: Request, timeout: float | None = None) -> Iterator[Any]:
    """Partial results until the call ends; Ctrl-C ends it cleanly (the call is cancelled)."""
    call(Ping(), timeout=state.timeout)  # a long stream must not hide an unreachable host
    items = state.client.stream(request, timeout=timeout)
    try:
        yield from items
    except BusError as exc:
        explain(exc)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
    finally:
        items.close()


def to_builtins(data: Any) -> Any:
    return msgspec.to_builtins(data, builtin_types=(datetime.datetime,))


def emit(data: Any, columns: list[str] | None = None) -> None:
    """Print a Struct, a dict or a list of them: JSON with --json, else a table (or key: value lines)."""
    plain = to_builtins(data)
    if state.json:
        sys.stdout.write(orjson.dumps(plain, option=orjson.OPT_INDENT_2, default=str).decode() + "\n")
        return
    if isinstance(plain, list):
        typer.echo(table(plain, columns))
    elif isinstance(plain, dict):
        width = max((len(k) for k in plain), default=0)
        for key, value in plain.items():
            if columns is None or key in columns:
                typer.echo(f"{key.ljust(width)}  {cell(value)}")
    else:
        typer.echo(cell(plain))


def cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".")
    if isinstance(value, (dict, list)):
        return orjson.dumps(value).decode() if value else "-"
    if value is None or value == "":
        return "-"
    return str(value)


def table(rows: Iterable[dict], columns: list[str] | None = None) -> str:
    rows = list(rows)
    if not rows:
        return "(none)"
    columns = columns or list(rows[0])
    cells = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)
