"""`baaaht-ctl auth`: `rules`, who may do what on the bus as the running broker has it; `keys ...`, the
CURVE keys of peers on other hosts (docs/IDENTITY.md).

`issue` makes the key pair here, writes it with the broker's public key into the file given
(0600, never over an existing one) and sends the broker only the public key: no secret crosses the bus.
"""

from __future__ import annotations

import os
import time
import typing
from pathlib import Path
from typing import Optional

import typer

from baaaht.bus import curve
from baaaht.common.units import parse_duration
from baaaht.ctl.common import Ctl, JsonOption, fail, iso_time
from baaaht.schemas.bus import (
    BusAuthKeysIssue,
    BusAuthKeysList,
    BusAuthKeysRevoke,
    BusAuthRules,
    KeyRecord,
    KeyRole,
)

app = typer.Typer(no_args_is_help=True, add_completion=False)
keys_app = typer.Typer(no_args_is_help=True, add_completion=False)
app.add_typer(keys_app, name="keys", help="CURVE keys of peers on other hosts (tcp://); operator only.")

KEY_COLUMNS = ["name", "role", "session", "issued", "expires", "state"]
ROLES = typing.get_args(KeyRole)


def key_row(record: KeyRecord, wall: float) -> dict:
    expired = bool(record.expires_at) and wall >= record.expires_at
    return {
        "name": record.name,
        "role": record.role,
        "session": record.session,
        "issued": iso_time(record.issued_at),
        "expires": iso_time(record.expires_at) if record.expires_at else "never",
        "state": "expired" if expired else "active",
        "public_key": record.public_key,
    }


@keys_app.command("issue")
def issue(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="The key's name: lower-case letters, digits, '.', '_', '-'."),
    role: str = typer.Option(..., "--role", help=f"What its holder is: {', '.join(ROLES)}."),
    out: Path = typer.Option(
        ..., "--out", help="Where to write the holder's key file (0600; must not exist)."
    ),
    session: str = typer.Option(
        "", "--session", help="The session an agent role acts in (agent roles only)."
    ),
    expires: Optional[str] = typer.Option(None, "--expires", help="Valid for this long (e.g. 1h, 720h)."),
    _json: JsonOption = False,
) -> None:
    """Issue a key for a peer on another host (its holder sets `bus.tcp_key_file` to the file written)."""
    ctl: Ctl = ctx.obj
    if role not in ROLES:
        fail(f"--role {role!r} is not a role (expected one of {', '.join(ROLES)})")
    if problem := curve.check_issue(role, session):
        fail(problem)
    ttl = 0.0
    if expires is not None:
        try:
            ttl = float(parse_duration(expires))
        except ValueError as exc:
            fail(f"--expires {expires!r} {exc}")
        if ttl <= 0:
            fail(f"--expires {expires!r} is not above zero (leave it out for a key that never expires)")
    try:  # claim the path first: a key the broker records must never lose its secret to a bad path
        os.close(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as exc:
        fail(f"--out {out}: {exc.strerror}")
    public, secret = curve.new_key_pair()
    try:
        request = BusAuthKeysIssue(name=name, public_key=public, role=role, session=session, ttl=ttl)
        result = ctl.call(request)
    except BaseException:
        out.unlink()
        raise
    keys = curve.ClientKeyFile(
        name=result.key.name,
        role=result.key.role,
        session=result.key.session,
        public_key=public,
        secret_key=secret,
        server_public_key=result.server_public_key,
        expires_at=result.key.expires_at,
    )
    curve.write_private(out, curve.encode_json(keys))
    typer.echo(f"wrote {out}: copy it to the peer's host and set bus.tcp_key_file to it", err=True)
    ctl.emit(key_row(result.key, result.key.issued_at), KEY_COLUMNS)


@keys_app.command("list")
def list_keys(ctx: typer.Context, _json: JsonOption = False) -> None:
    """The keys issued, and the broker's public key."""
    ctl: Ctl = ctx.obj
    result = ctl.call(BusAuthKeysList())
    wall = time.time()
    if ctl.json:
        ctl.emit(
            {"keys": [key_row(r, wall) for r in result.keys], "server_public_key": result.server_public_key}
        )
        return
    ctl.emit([key_row(r, wall) for r in result.keys], KEY_COLUMNS)
    typer.echo(f"server public key: {result.server_public_key}", err=True)


@keys_app.command("revoke")
def revoke(
    ctx: typer.Context, name: str = typer.Argument(..., help="The key's name."), _json: JsonOption = False
) -> None:
    """Revoke a key at once: its connections are closed and it is refused from now on."""
    ctl: Ctl = ctx.obj
    result = ctl.call(BusAuthKeysRevoke(name=name))
    typer.echo(f"revoked {result.key.name}: {result.disconnected} connection(s) closed", err=True)
    if ctl.json:
        ctl.emit(result)


@app.command()
def rules(ctx: typer.Context, _json: JsonOption = False) -> None:
    """The permission table (roles × actions × patterns, the first match decides, default deny) and the
    topics each service may publish."""
    ctl: Ctl = ctx.obj
    result = ctl.call(BusAuthRules())
    if ctl.json:
        ctl.emit(result)
        return
    rows = [
        {"role": r.role, "action": r.action, "allowed": ", ".join(r.patterns) or "nothing"}
        for r in result.rules
    ]
    ctl.emit(rows, ["role", "action", "allowed"])
    typer.echo("")
    domains = [
        {"service": s, "publishes": ", ".join(dict.fromkeys([f"{s}.*", *t]))}
        for s, t in result.domains.items()
    ]
    ctl.emit(domains, ["service", "publishes"])
    typer.echo("(`!pattern` denies; a service not listed publishes `<its name>.*` only)", err=True)
