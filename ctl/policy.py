"""`baaaht-ctl policy ...` (the container policy) and `baaaht-ctl audit ...` (its decision log).

`policy check` works without the bus: it reads the file itself, so it helps most when the policy
service refuses a bad policy file. The `audit` commands ask the policy service, which reads the
running host's log wherever its data directory is.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
import yaml

from baaaht.common.policy import document
from baaaht.common.policy.document import allowlist_symlink_warnings
from baaaht.ctl import bodies
from baaaht.ctl.common import (
    EXIT_ERROR,
    Ctl,
    JsonOption,
    LooseOption,
    fail,
    interruptible,
    iso_time,
    json_line,
    table,
    table_rows,
    to_builtins,
)
from baaaht.schemas.containers import ContainerSpec
from baaaht.schemas.policy import (
    AuditRecord,
    PolicyAuditTail,
    PolicyAuditVerify,
    PolicyExplain,
    PolicyGet,
    PolicyReload,
    Principal,
)

app = typer.Typer(no_args_is_help=True, add_completion=False)
audit_app = typer.Typer(no_args_is_help=True, add_completion=False)

FOLLOW_TIMEOUT = 7 * 24 * 3600.0  # a follower runs until Ctrl-C; the stream still needs a deadline
CHECK_COLUMNS = ["outcome", "rule", "message"]
TAIL_COLUMNS = ["seq", "time", "action", "decision", "user", "session", "image", "rules", "policy"]


def read_input(source: str) -> str:
    """FILE, `-` for stdin, or the text itself when it starts with `{`."""
    if source == "-":
        return sys.stdin.read()
    if source.lstrip().startswith("{"):
        return source
    try:
        return Path(source).read_text(encoding="utf-8")
    except OSError as error:
        fail(f"cannot read {source}: {error.strerror}")


def parse_override(text: str) -> dict:
    if not text:
        return {}
    try:
        return document.parse_text(read_input(text))
    except document.DocumentError as error:
        fail(f"--override: {error}")


# --- policy ------------------------------------------------------------------------------------


@app.command()
def show(
    ctx: typer.Context,
    override: str = typer.Option("", "--override", help="A session override (FILE, - or JSON) to apply."),
    _json: JsonOption = False,
) -> None:
    """The policy in force (and its version), as YAML."""
    ctl: Ctl = ctx.obj
    info = ctl.call(PolicyGet(override=parse_override(override)))
    if ctl.json:
        ctl.emit(info)
        return
    typer.echo(f"# version {info.version}, from {info.source}, loaded {iso_time(info.loaded_at)}")
    last = info.last_reload
    if last is not None and last.ok:
        typer.echo(f"# last reload: ok, {iso_time(last.time)}, from {last.source}")
    elif last is not None:
        typer.echo(f"# last reload: FAILED, {iso_time(last.time)}, from {last.source}: {last.error}")
        typer.echo("# the policy below stays in force until the file is fixed")
    for refused in info.refused:
        typer.echo(f"# override refused: {refused.path}: {refused.message}")
    typer.echo(yaml.safe_dump(info.document, sort_keys=False).rstrip())
    if info.narrowing:
        typer.echo("# the session's own allow-lists, checked as well:")
        typer.echo(yaml.safe_dump(info.narrowing, sort_keys=False).rstrip())


@app.command()
def check(
    ctx: typer.Context,
    file: str = typer.Argument(..., help="A policy document (YAML or JSON), or - for stdin."),
    _json: JsonOption = False,
) -> None:
    """Check a policy document without loading it (no bus needed); exit 1 when it is refused."""
    ctl: Ctl = ctx.obj
    try:
        loaded = document.load(
            document.parse_text(read_input(file)), document.HostDefaults.for_config(ctl.config)
        )
    except document.DocumentError as error:
        if ctl.json:
            ctl.emit({"valid": False, "errors": error.errors})
        else:
            for problem in error.errors:
                typer.echo(f"{problem.path or '(document)'}: {problem.message}", err=True)
        raise typer.Exit(EXIT_ERROR) from None
    warnings = allowlist_symlink_warnings(loaded.mounts.allowlist)
    if ctl.json:
        ctl.emit({"valid": True, "version": document.version_of(loaded), "warnings": warnings})
        return
    for warning in warnings:
        typer.echo(f"warning: {warning.path}: {warning.message}", err=True)
    typer.echo(f"{file}: valid, mode {loaded.mode}, version {document.version_of(loaded)}")


GROUP_OPTION = typer.Option(None, "--group", help="The user's groups (repeatable).")


@app.command()
def explain(
    ctx: typer.Context,
    spec: str = typer.Argument(..., help="A container spec as JSON: FILE, - for stdin, or the JSON itself."),
    user: str = typer.Option("", "--user", help="On whose behalf (picks allowlist entries)."),
    group: Optional[list[str]] = GROUP_OPTION,
    session: str = typer.Option("", "--session", help="The session id."),
    role: str = typer.Option("", "--role", help="The container's role, e.g. agent."),
    override: str = typer.Option("", "--override", help="A session override (FILE, - or JSON)."),
    _json: JsonOption = False,
    _loose: LooseOption = False,
) -> None:
    """Which rules pass, fail or fill in what, for one container spec (nothing is created or audited)."""
    ctl: Ctl = ctx.obj
    container = bodies.decode(read_input(spec), ContainerSpec, "container spec", ctl.loose)
    principal = Principal(user=user, groups=group or [], session_id=session, role=role)
    request = PolicyExplain(spec=container, principal=principal, override=parse_override(override))
    explanation = ctl.call(request)
    if ctl.json:
        ctl.emit(explanation)
        return
    decision = explanation.decision
    typer.echo(table(to_builtins(explanation.checks), CHECK_COLUMNS))
    for warning in decision.warnings:
        typer.echo(f"warning {warning.rule}: {warning.message}")
    typer.echo(f"\n{explanation.summary} (mode {decision.mode}, policy {decision.policy_version})")
    if not decision.allowed:
        raise typer.Exit(EXIT_ERROR)


@app.command()
def reload(ctx: typer.Context, _json: JsonOption = False) -> None:
    """Read the policy file again now (as SIGHUP does); a bad file is refused and changes nothing."""
    ctl: Ctl = ctx.obj
    result = ctl.call(PolicyReload())
    if ctl.json:
        ctl.emit(result)
        return
    change = (
        f"{result.previous_version} -> {result.version}"
        if result.changed
        else f"unchanged ({result.version})"
    )
    typer.echo(f"policy from {result.source}: {change}")


# --- audit -------------------------------------------------------------------------------------


def row(record: AuditRecord) -> dict:
    return {
        "seq": record.seq,
        "time": iso_time(record.time),
        "action": record.action,
        "decision": record.decision,
        "user": record.principal.user,
        "session": record.principal.session_id,
        "image": record.image,
        "rules": ",".join(record.rules),
        "policy": record.policy_version,
    }


def show_records(ctl: Ctl, records: list[AuditRecord], header: bool) -> None:
    if ctl.json:
        for record in records:
            json_line(record)
    elif records:
        typer.echo(table_rows([row(r) for r in records], TAIL_COLUMNS, header))
        sys.stdout.flush()


@audit_app.command()
def tail(
    ctx: typer.Context,
    lines: int = typer.Option(20, "--lines", "-n", help="How many of the last records."),
    since: int = typer.Option(0, "--since", help="Only records after this sequence number."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new records (Ctrl-C ends)."),
    _json: JsonOption = False,
) -> None:
    """The host's last decisions (one JSON record per line with --json)."""
    ctl: Ctl = ctx.obj
    if lines < 0:
        fail(f"--lines must be 0 or more, not {lines}")
    if since < 0:
        fail(f"--since must be 0 or more, not {since}")
    request = PolicyAuditTail(limit=lines, since=since, follow=follow)
    with interruptible():
        for index, batch in enumerate(ctl.stream(request, timeout=FOLLOW_TIMEOUT if follow else None)):
            show_records(ctl, batch.records, header=index == 0)


@audit_app.command()
def verify(ctx: typer.Context, _json: JsonOption = False) -> None:
    """Check the host's hash chain: any edited, removed or reordered line is reported; exit 1 if so."""
    ctl: Ctl = ctx.obj
    report = ctl.call(PolicyAuditVerify())
    if ctl.json:
        ctl.emit(report)
    else:
        for problem in report.problems:
            typer.echo(
                f"{'line ' + str(problem.line) if problem.line else 'log'}: {problem.message}", err=True
            )
        for warning in report.warnings:
            typer.echo(
                f"warning: {'line ' + str(warning.line) if warning.line else 'log'}: {warning.message}",
                err=True,
            )
        verdict = "intact" if report.ok else "TAMPERED OR DAMAGED"
        typer.echo(f"{report.path}: {verdict}, {report.records} records, last hash {report.last_hash[:16]}")
    if not report.ok:
        raise typer.Exit(EXIT_ERROR)
