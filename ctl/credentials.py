"""`baaaht-ctl credentials ...`: secrets kept by the credential manager.

A value is read from a prompt that does not echo it (asked twice) or, with `--from-stdin`, from
standard input; never from the command line, where `ps` and shell history would show it. No
command ever prints a value: the service never returns one.
"""

from __future__ import annotations

import enum
import getpass
import sys
import time
from typing import Optional

import typer

from baaaht.common.units import parse_duration
from baaaht.ctl.common import Ctl, JsonOption, fail, iso_time, option_value
from baaaht.schemas.credentials import (
    MAX_PAGE,
    MAX_VALUE,
    CredentialDelete,
    CredentialDescribe,
    CredentialInfo,
    CredentialList,
    CredentialPut,
    CredentialRotate,
    CredentialRotateMaster,
)
from baaaht.schemas.egress import CredentialUsage

app = typer.Typer(no_args_is_help=True, add_completion=False)


class Kind(str, enum.Enum):
    """The CLI spells kinds with dashes; the wire with underscores."""

    API_KEY = "api-key"
    BEARER_TOKEN = "bearer-token"
    BASIC = "basic"

    @property
    def wire(self) -> str:
        return self.value.replace("-", "_")


FROM_STDIN_HELP = "Read the value from standard input (one trailing newline is dropped) instead of a prompt."
EXPIRES_HELP = "Never hand it out after this long from now, e.g. 720h."


def read_value(from_stdin: bool) -> bytes:
    """The secret, from stdin or from a prompt without echo; never from argv."""
    if from_stdin:
        value = sys.stdin.buffer.read(MAX_VALUE + 3)
        value = value.removesuffix(b"\n").removesuffix(b"\r")
    else:
        if not sys.stdin.isatty():
            fail("no terminal to prompt on: give the value on standard input with --from-stdin")
        first = getpass.getpass("value (not echoed): ")
        if getpass.getpass("the same again: ") != first:
            fail("the two values differ: nothing was stored")
        value = first.encode()
    if not value:
        fail("the value is empty: nothing was stored")
    if len(value) > MAX_VALUE:
        fail(f"the value is longer than {MAX_VALUE} bytes: nothing was stored")
    return value


def expiry(expires_in: Optional[str]) -> float:
    if expires_in is None:
        return 0.0
    return time.time() + float(option_value("--expires-in", expires_in, parse_duration))


def credential_row(info: CredentialInfo) -> dict:
    return {
        "name": info.name,
        "kind": info.kind,
        "version": info.version,
        "created": iso_time(info.created_at),
        "rotated": iso_time(info.rotated_at),
        "expires": iso_time(info.expires_at),
        "last_used": iso_time(info.last_used_at),
        "expired": "yes" if info.expired else "no",
    }


def show(ctl: Ctl, info: CredentialInfo) -> None:
    ctl.emit(info if ctl.json else credential_row(info))


@app.command()
def add(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="The credential's name, as routes name it."),
    kind: Kind = typer.Option(..., "--kind", help="How it is used upstream (basic: user:password)."),
    from_stdin: bool = typer.Option(False, "--from-stdin", help=FROM_STDIN_HELP),
    description: str = typer.Option("", "--description"),
    expires_in: Optional[str] = typer.Option(None, "--expires-in", help=EXPIRES_HELP),
    _json: JsonOption = False,
) -> None:
    """Add a secret (the value from a prompt, or stdin with --from-stdin)."""
    ctl: Ctl = ctx.obj
    expires_at = expiry(expires_in)
    value = read_value(from_stdin)
    request = CredentialPut(
        name=name, kind=kind.wire, value=value, description=description, expires_at=expires_at
    )
    show(ctl, ctl.call(request))


@app.command("list")
def list_credentials(
    ctx: typer.Context,
    limit: int = typer.Option(1000, "--limit", min=1, help="At most this many, oldest first."),
    _json: JsonOption = False,
) -> None:
    """Every secret's metadata (never a value), oldest first."""
    ctl: Ctl = ctx.obj
    found: list[CredentialInfo] = []
    cursor = 0
    while len(found) < limit:
        page = ctl.call(CredentialList(limit=min(MAX_PAGE, limit - len(found)), cursor=cursor))
        found += page.credentials
        if not (cursor := page.next_cursor):
            break
    ctl.emit(found if ctl.json else [credential_row(info) for info in found])


@app.command()
def describe(
    ctx: typer.Context, name: str = typer.Argument(..., help="The credential."), _json: JsonOption = False
) -> None:
    """One secret's metadata and versions."""
    ctx.obj.emit(ctx.obj.call(CredentialDescribe(name=name)))


@app.command()
def rotate(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="The credential."),
    from_stdin: bool = typer.Option(False, "--from-stdin", help=FROM_STDIN_HELP),
    expires_in: Optional[str] = typer.Option(None, "--expires-in", help=EXPIRES_HELP),
    no_expiry: bool = typer.Option(False, "--no-expiry", help="The new version never expires."),
    grace: Optional[str] = typer.Option(
        None, "--grace", help="Keep the previous version this long (default: credentials.grace_period)."
    ),
    _json: JsonOption = False,
) -> None:
    """A new value (prompted, or stdin with --from-stdin); the previous one is erased after a grace period."""
    ctl: Ctl = ctx.obj
    if no_expiry and expires_in is not None:
        fail("--expires-in and --no-expiry contradict each other")
    expires_at = 0.0 if no_expiry else (expiry(expires_in) if expires_in is not None else None)
    grace_seconds = None if grace is None else float(option_value("--grace", grace, parse_duration))
    value = read_value(from_stdin)
    show(ctl, ctl.call(CredentialRotate(name=name, value=value, expires_at=expires_at, grace=grace_seconds)))


@app.command("rm")
def remove(
    ctx: typer.Context, name: str = typer.Argument(..., help="The credential."), _json: JsonOption = False
) -> None:
    """Erase a secret and every version of it."""
    ctl: Ctl = ctx.obj
    ctl.call(CredentialDelete(name=name))
    if ctl.json:
        ctl.emit({"name": name, "deleted": True})
    else:
        typer.echo(f"credential {name} deleted")


@app.command()
def usage(
    ctx: typer.Context,
    session: str = typer.Option("", "--session", help="Only this session."),
    _json: JsonOption = False,
) -> None:
    """Egress calls and LLM tokens per session, against their budgets (0: no cap)."""
    ctl: Ctl = ctx.obj
    sessions = ctl.call(CredentialUsage(session_id=session)).sessions
    ctl.emit(
        sessions
        if ctl.json
        else [
            {
                "session": found.session_id,
                "requests": found.requests,
                "refused": found.refused,
                "input_tokens": found.input_tokens,
                "output_tokens": found.output_tokens,
                "request_cap": found.request_cap,
                "token_cap": found.token_cap,
                "bytes_out": found.bytes_out,
                "bytes_in": found.bytes_in,
            }
            for found in sessions
        ]
    )


@app.command("rotate-master")
def rotate_master(ctx: typer.Context, _json: JsonOption = False) -> None:
    """Wrap every data key under a new master key (a new key file, or the passphrase read again)."""
    ctx.obj.emit(ctx.obj.call(CredentialRotateMaster()))
