"""What every baaaht-ctl command shares: the options, the bus connection, output and errors.

The root callback puts one `Ctl` into the Typer context (`ctx.obj`); commands are thin: build a
request, `ctl.call` it, `ctl.emit` the result. Data goes to stdout (a table for people, JSON with
`--json`); messages go to stderr. Every timestamp is printed one way, in tables and JSON alike:
ISO 8601 UTC to the second (`2026-12-01T09:00:00Z`).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, Iterable, Iterator, TextIO, TypeVar

import msgspec
import orjson
import typer

from baaaht.bus.client import BusClient
from baaaht.bus.curve import KeyFileError
from baaaht.bus.errors import BusError
from baaaht.bus.protocol import is_broker_unreachable
from baaaht.common.config import ConfigError, load_config
from baaaht.common.endpoints import Endpoints, ipc_path
from baaaht.schemas.base import Request
from baaaht.schemas.bus import BusPing
from baaaht.schemas.config import Config
from baaaht.schemas.errors import ErrorCode

T = TypeVar("T")
EXIT_ERROR = 1
EXIT_UNREACHABLE = 2
# C0 and C1 control characters but newline and tab: text agents wrote (messages, partials, file names)
# reaches the operator's terminal, where an escape sequence would be obeyed (clipboard writes, cursor moves)
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
WHERE_HINT = "Point baaaht-ctl elsewhere with --run-dir DIR, BAAAHT_RUN_DIR or --config FILE"


def fail(message: str, code: int = EXIT_ERROR) -> None:
    typer.echo(message, err=True)
    raise typer.Exit(code)


@dataclass
class Ctl:
    """The options of one baaaht-ctl run and the bus connection made from them."""

    config_path: str | None = None
    run_dir: str | None = None
    timeout: float = 5.0
    json: bool = False
    loose: bool = False
    _loaded: tuple[Config, dict[str, str]] | None = field(default=None, repr=False)
    _client: BusClient | None = field(default=None, repr=False)

    # -- configuration and connection -------------------------------------------------------------

    def load(self, path: str | None, env: dict[str, str] | None = None) -> tuple[Config, dict[str, str]]:
        """A config and its sources, with `--run-dir` applied as a flag (it beats file and environment)."""
        flags = {"bus.run_dir": self.run_dir} if self.run_dir else {}
        try:
            return load_config(path, env=os.environ if env is None else env, flags=flags)
        except ConfigError as exc:
            fail(f"bad configuration: {exc}")

    @property
    def config(self) -> Config:
        if self._loaded is None:
            self._loaded = self.load(self.config_path)
        return self._loaded[0]

    @property
    def sources(self) -> dict[str, str]:
        self.config  # noqa: B018 - loads both
        return self._loaded[1]

    @property
    def socket(self) -> str:
        return ipc_path(Endpoints.for_config(self.config.bus).services) or ""

    @property
    def client(self) -> BusClient:
        if self._client is None:
            if not self.config.bus.tcp_key_file and not os.path.exists(self.socket):
                fail(
                    f"no host at {self.socket}: the socket does not exist. Is baaaht-orchestrator "
                    f"running (`make run`)? {WHERE_HINT}.",
                    EXIT_UNREACHABLE,
                )
            try:
                self._client = BusClient.for_config(self.config, timeout=self.timeout)
            except KeyFileError as exc:
                fail(f"bus.tcp_key_file: {exc}")
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- calls ------------------------------------------------------------------------------------

    def call(self, request: Request, timeout: float | None = None) -> Any:
        try:
            return self.client.call(request, timeout=timeout)
        except BusError as exc:
            self.explain(exc)

    def call_raw(self, target: str, body: bytes) -> bytes:
        try:
            return self.client.call_raw(target, body)
        except BusError as exc:
            self.explain(exc)

    def stream(self, request: Request, timeout: float | None = None) -> Iterator[Any]:
        """Partial results until the call ends; leaving early cancels the call. Consume it
        `with interruptible():` so that Ctrl-C ends the command cleanly."""
        self.call(BusPing(), timeout=self.timeout)  # a long stream must not hide an unreachable host
        items = self.client.stream(request, timeout=timeout)
        try:
            yield from items
        except BusError as exc:
            self.explain(exc)
        finally:
            items.close()

    def explain(self, error: BusError) -> None:
        """Print a bus error for people and exit non-zero: "is the host running?" only when no broker is
        connected; a TIMEOUT is a timeout."""
        if is_broker_unreachable(error):
            fail(
                f"the host at {self.socket} does not answer ({error.message}): is baaaht-orchestrator "
                f"running? {WHERE_HINT}.",
                EXIT_UNREACHABLE,
            )
        details = f" {orjson.dumps(error.details).decode()}" if error.details else ""
        if error.code is ErrorCode.TIMEOUT:
            fail(f"error TIMEOUT: {error.message}{details} (timed out: --timeout {self.timeout:g}s)")
        fail(f"error {error.code.value}: {error.message}{details}")

    # -- output -----------------------------------------------------------------------------------

    def emit(self, data: Any, columns: list[str] | None = None) -> None:
        """A Struct, a dict or a list of them: JSON with --json, else a table (or key: value lines)."""
        if self.json:
            print_json(data)
            return
        plain = to_builtins(data)
        if isinstance(plain, list):
            typer.echo(table(plain, columns))
        elif isinstance(plain, dict):
            width = max((len(k) for k in plain), default=0)
            for key, value in plain.items():
                if columns is None or key in columns:
                    typer.echo(f"{key.ljust(width)}  {cell(value)}")
        else:
            typer.echo(cell(plain))


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Ctrl-C ends a follower cleanly (exit 0), wherever in the loop it lands."""
    try:
        yield
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)


def print_json(data: Any) -> None:
    sys.stdout.write(orjson.dumps(to_builtins(data), option=orjson.OPT_INDENT_2).decode() + "\n")


def json_line(data: Any, out: TextIO | None = None) -> None:
    """One record of a stream or an export, as one line of JSON (times as everywhere else)."""
    out = out or sys.stdout
    out.write(orjson.dumps(to_builtins(data)).decode() + "\n")
    out.flush()


def set_json(ctx: typer.Context, value: bool) -> None:
    if value:
        ctx.ensure_object(Ctl).json = True


def set_loose(ctx: typer.Context, value: bool) -> None:
    if value:
        ctx.ensure_object(Ctl).loose = True


# `--json` is accepted before the command (the root callback's) and after it (every command's).
JSON_HELP = "Print JSON for scripts (one object per line for streams)."
JsonOption = Annotated[bool, typer.Option("--json", help=JSON_HELP, callback=set_json, expose_value=False)]
LooseOption = Annotated[
    bool,
    typer.Option(
        "--loose",
        help="Send a body with fields its schema does not know (checked strictly otherwise).",
        callback=set_loose,
        expose_value=False,
    ),
]


def key_values(option: str, pairs: list[str] | None) -> dict[str, str]:
    """`--label K=V` and `--env K=V`, repeated, as a mapping."""
    found = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            fail(f"{option} {pair!r}: expected KEY=VALUE")
        found[key] = value
    return found


def option_value(option: str, text: str, parse: Callable[[str], T]) -> T:
    """A size or duration option read with the config's own parser; a bad one is named."""
    try:
        return parse(text)
    except ValueError as exc:
        fail(f"{option} {text!r} {exc}")


# -- rendering ---------------------------------------------------------------------------------------


def is_timestamp(key: str) -> bool:
    """The wire's naming rule for points in time (ages and durations are named otherwise)."""
    return key in ("time", "created") or key.endswith("_at")


def iso_time(value: Any) -> Any:
    """Epoch seconds or an engine's RFC 3339 text (nanoseconds, offsets) as `2026-12-01T09:00:00Z`."""
    if not value or isinstance(value, bool):
        return None  # 0 and "" mean "never" on the wire
    if isinstance(value, (int, float)):
        moment = datetime.datetime.fromtimestamp(value, datetime.timezone.utc)
    elif isinstance(value, str):
        head, _, fraction = value.replace("Z", "+00:00").partition(".")
        try:  # fromisoformat takes at most microseconds: drop the fraction, keep the offset
            moment = datetime.datetime.fromisoformat(head + fraction.lstrip("0123456789"))
        except ValueError:
            return value
        if moment.year <= 1:  # the engine's "never"
            return None
    elif isinstance(value, datetime.datetime):
        moment = value
    else:
        return value
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def with_iso_times(plain: Any) -> Any:
    if isinstance(plain, dict):
        return {k: iso_time(v) if is_timestamp(k) else with_iso_times(v) for k, v in plain.items()}
    if isinstance(plain, list):
        return [with_iso_times(v) for v in plain]
    return plain


def to_builtins(data: Any) -> Any:
    return with_iso_times(msgspec.to_builtins(data, builtin_types=(datetime.datetime,)))


def visible(text: str) -> str:
    """`text` with its control characters (but newline and tab) shown as \\xNN escapes, for a terminal."""
    return _CONTROL.sub(lambda found: f"\\x{ord(found.group()):02x}", text)


def cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".")
    if isinstance(value, (dict, list)):
        return orjson.dumps(value).decode() if value else "-"
    if value is None or value == "":
        return "-"
    return visible(str(value))


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


def table_rows(rows: list[dict], columns: list[str], header: bool) -> str:
    """Rows of a table printed as they come: the header only with the first ones."""
    lines = table(rows, columns).splitlines()
    return "\n".join(lines if header else lines[1:])
