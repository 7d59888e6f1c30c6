"""baaaht-ctl: the operator's CLI and bus inspector."""

from __future__ import annotations

import collections
import importlib.metadata
import time
from typing import Optional

import msgspec
import orjson
import typer

from baaaht.bus.errors import BusError
from baaaht.ctl import bodies
from baaaht.ctl.common import (
    EXIT_ERROR,
    JSON_HELP,
    Ctl,
    JsonOption,
    LooseOption,
    fail,
    interruptible,
    iso_time,
    json_line,
    print_json,
    table,
    to_builtins,
)
from baaaht.schemas.base import SCHEMA_VERSION, Request, known_types
from baaaht.schemas.bus import BusEventsReplay, BusPing, BusServices, BusStats

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Operate a baaaht host. `--json` (before or after the command) prints JSON for scripts.",
)

# Every page of an event replay: the broker's own cap is its whole history.
REPLAY_PAGE = 1000
# The services a host runs (supervisord.conf): `status` fails when one of them is missing.
EXPECTED_SERVICES = ("container", "session", "policy", "credential", "task")  # task: the scheduler process


def show_version(value: bool) -> None:
    if value:
        typer.echo(f"baaaht-ctl {importlib.metadata.version('baaaht')} (wire schema {SCHEMA_VERSION})")
        raise typer.Exit()


@app.callback()
def options(
    ctx: typer.Context,
    config: Optional[str] = typer.Option(
        None, "--config", "-c", help="Config file (YAML or JSON).", envvar="BAAAHT_CONFIG"
    ),
    run_dir: Optional[str] = typer.Option(
        None,
        "--run-dir",
        help="The host's run directory, where its sockets are (default: the config's bus.run_dir).",
        envvar="BAAAHT_RUN_DIR",
    ),
    timeout: float = typer.Option(5.0, "--timeout", help="Seconds to wait for the bus."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    version: bool = typer.Option(
        False, "--version", callback=show_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    ctl = ctx.ensure_object(Ctl)
    ctl.config_path, ctl.run_dir, ctl.timeout = config, run_dir, timeout
    ctl.json = ctl.json or as_json
    ctx.call_on_close(ctl.close)


@app.command()
def ping(ctx: typer.Context, _json: JsonOption = False) -> None:
    """Round trip to the broker."""
    ctl: Ctl = ctx.obj
    started = time.perf_counter()
    pong = ctl.call(BusPing())
    elapsed_ms = (time.perf_counter() - started) * 1000
    if ctl.json:
        ctl.emit({"rtt_ms": elapsed_ms, **to_builtins(pong)})
    else:
        you = f"you are on the {pong.caller.socket} socket as uid {pong.caller.uid}"
        typer.echo(f"broker pid {pong.broker_pid} answered in {elapsed_ms:.2f} ms ({you})")


def instance_rows(services) -> list[dict]:
    return [
        {
            "service": s.name,
            "instance": i.instance,
            "pid": i.pid,
            "healthy": "yes" if i.healthy else f"no: {i.reason}",
            "in_flight": i.in_flight,
            "served": i.served,
            "heartbeat_age": i.heartbeat_age,
            "methods": len(i.methods),
        }
        for s in services
        for i in s.instances
    ]


@app.command()
def services(
    ctx: typer.Context,
    name: str = typer.Argument("", help="Only this service."),
    _json: JsonOption = False,
) -> None:
    """Registered services, their instances, health and load."""
    ctl: Ctl = ctx.obj
    result = ctl.call(BusServices(service=name))
    ctl.emit(result.services if ctl.json else instance_rows(result.services))


def service_problems(listed) -> list[str]:
    """Why the host is not healthy: an expected service without instances, or an unhealthy instance."""
    present = {s.name for s in listed if s.instances}
    problems = [
        f"service {name}: no instance registered" for name in EXPECTED_SERVICES if name not in present
    ]
    problems += [
        f"service {s.name}: instance {i.instance} unhealthy: {i.reason or 'no reason given'}"
        for s in listed
        for i in s.instances
        if not i.healthy
    ]
    return problems


@app.command()
def status(ctx: typer.Context, _json: JsonOption = False) -> None:
    """Is the host up: the broker, its services (container, session, policy, credential, task) and its
    counters.
    Exits 1 when an expected service is missing or unhealthy."""
    ctl: Ctl = ctx.obj
    pong = ctl.call(BusPing())
    listed = ctl.call(BusServices()).services
    stats = ctl.call(BusStats())
    problems = service_problems(listed)
    if ctl.json:
        ctl.emit(
            {
                "broker": pong,
                "services": listed,
                "stats": stats,
                "healthy": not problems,
                "problems": problems,
            }
        )
    else:
        typer.echo(
            f"broker   pid {pong.broker_pid}, up {stats.uptime:.0f}s, {stats.messages_in} messages in, "
            f"{sum(stats.errors.values())} errors, last event #{stats.last_event_seq}"
        )
        typer.echo(
            table(instance_rows(listed), ["service", "instance", "pid", "healthy", "in_flight", "served"])
        )
        for problem in problems:
            typer.echo(problem, err=True)
    if problems:
        raise typer.Exit(EXIT_ERROR)


@app.command()
def stats(ctx: typer.Context, _json: JsonOption = False) -> None:
    """Broker counters: messages, bytes, errors by code, per service."""
    ctx.obj.emit(ctx.obj.call(BusStats()))


@app.command("call")
def call_command(
    ctx: typer.Context,
    target: str = typer.Argument(..., help="service.method, e.g. session.get"),
    body: str = typer.Argument("{}", help="The request as JSON."),
    stream: bool = typer.Option(False, "--stream", help="The method streams: print each partial result."),
    _json: JsonOption = False,
    _loose: LooseOption = False,
) -> None:
    """Call any method with a JSON body, checked against its schema; the result is printed as JSON."""
    ctl: Ctl = ctx.obj
    request_type = known_types().get(target)
    if not (isinstance(request_type, type) and issubclass(request_type, Request)):
        request_type = None
    if stream:
        if request_type is None:
            fail(f"--stream needs a known request type; {target!r} is not one (baaaht-ctl schema lists them)")
        with interruptible():
            for item in ctl.stream(bodies.decode(body, request_type, target, ctl.loose)):
                json_line(item)
        return
    result = ctl.call_raw(target, bodies.encode(body, request_type, target, ctl.loose))
    print_json(msgspec.msgpack.decode(result))


def recent_events(ctl: Ctl, topics: list[str], limit: int) -> tuple[list, int]:
    """The last `limit` kept events of these topics (counting only those), and where history ends."""
    kept: collections.deque = collections.deque(maxlen=limit)
    since = 0
    while True:
        page = ctl.call(BusEventsReplay(since=since, topics=topics, limit=REPLAY_PAGE))
        kept.extend(page.events)
        if len(page.events) < REPLAY_PAGE:
            return list(kept), page.last_seq
        since = page.events[-1].seq


EVENT_COLUMNS = ["seq", "time", "topic", "source", "event"]


@app.command()
def events(
    ctx: typer.Context,
    topic: list[str] = typer.Option([], "--topic", "-t", help="Topic prefix (repeatable)."),
    since: Optional[int] = typer.Option(
        None, "--since", help="Replay kept events after this sequence number."
    ),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing live events (Ctrl-C ends)."),
    limit: int = typer.Option(
        50, "--limit", min=1, help="Without --since: how many recent events (of these topics) to show."
    ),
    _json: JsonOption = False,
) -> None:
    """Show events: recent or since a sequence number, and live with --follow."""
    ctl: Ctl = ctx.obj
    if since is None:
        recent, since = recent_events(ctl, topic, limit)
    else:
        recent = ctl.call(BusEventsReplay(since=since, topics=topic, limit=REPLAY_PAGE)).events
        since = recent[-1].seq if recent else since
    printer = EventPrinter(ctl)
    for event in recent:
        printer.show(event.seq, event.time, event.topic, event.source, bytes(event.body))
    if not follow:
        printer.finish()
        return
    try:
        with interruptible(), ctl.client.subscribe(topic, since=since) as subscription:
            for delivery in subscription:
                printer.show(delivery.seq, delivery.time, delivery.topic, delivery.source, delivery.body)
    except BusError as exc:
        ctl.explain(exc)


class EventPrinter:
    """Events as JSON lines, or as table rows under one header row."""

    def __init__(self, ctl: Ctl):
        self.ctl = ctl
        self.header_shown = False

    def show(self, seq: int, at: float, topic: str, source: str, body: bytes) -> None:
        try:
            payload = msgspec.msgpack.decode(body)
        except msgspec.DecodeError:
            payload = body.hex()
        record = {"seq": seq, "time": at, "topic": topic, "source": source, "event": payload}
        if self.ctl.json:
            json_line(record)
            return
        row = {**record, "time": iso_time(at), "event": orjson.dumps(to_builtins(payload)).decode()}
        self._print(f"{seq:>6}  {row['time']}  {topic:<28}  {source:<12}  {row['event']}")

    def finish(self) -> None:
        if not self.ctl.json and not self.header_shown:
            typer.echo("(none)")

    def _print(self, line: str) -> None:
        if not self.header_shown:
            typer.echo(f"{'SEQ':>6}  {'TIME':<20}  {'TOPIC':<28}  {'SOURCE':<12}  EVENT")
            self.header_shown = True
        typer.echo(line)
        typer.get_text_stream("stdout").flush()


def wire_types() -> list[type]:
    """Types that travel: not the bases that requests or events share (`ContainerRef`,
    `ContainerEvent`), which are never sent themselves."""
    return [t for t in set(known_types().values()) if not t.__subclasses__()]


@app.command()
def schema(
    ctx: typer.Context,
    name: str = typer.Argument("", help="A type name or tag, e.g. session.create."),
    _json: JsonOption = False,
) -> None:
    """List the wire types, or print one type's JSON Schema."""
    ctl: Ctl = ctx.obj
    if not name:
        rows = sorted(
            (
                {"tag": t.__struct_config__.tag or "-", "type": t.__name__, "role": role_of(t)}
                for t in wire_types()
            ),
            key=lambda r: (r["role"], r["tag"], r["type"]),
        )
        ctl.emit(rows)
        return
    found = known_types().get(name)
    if found is None:
        fail(f"unknown schema type {name!r} (baaaht-ctl schema lists them)")
    print_json(msgspec.json.schema(found))


def role_of(cls: type) -> str:
    return next(base.__name__.lower() for base in cls.__mro__ if base.__module__.endswith("schemas.base"))


def register_domains() -> None:
    """The domain command groups live beside their services' schemas."""
    from baaaht.ctl import (
        agents,
        auth,
        chat,
        config_cmd,
        containers,
        credentials,
        policy,
        pool,
        session_files,
        sessions,
        tasks,
        tools,
    )

    app.add_typer(agents.app, name="agents", help="Agents connected to the bus.")
    app.add_typer(config_cmd.app, name="config", help="The effective configuration.")
    app.add_typer(containers.app, name="containers", help="Containers on this host.")
    app.add_typer(pool.app, name="pool", help="The warm pool of worker containers.")
    app.add_typer(tools.app, name="tools", help="The worker's tools, run in a session.")
    app.add_typer(credentials.app, name="credentials", help="Secrets kept by the credential manager.")
    sessions.app.command("files")(session_files.files)
    sessions.app.command("cp")(session_files.cp)
    app.add_typer(sessions.app, name="sessions", help="Sessions and their conversations.")
    app.add_typer(policy.app, name="policy", help="The container policy.")
    app.add_typer(policy.audit_app, name="audit", help="The policy decision audit log.")
    app.add_typer(auth.app, name="auth", help="Who may do what on the bus, and keys of peers on other hosts.")
    app.command("send")(sessions.send)
    app.command("chat")(chat.chat)
    app.add_typer(tasks.app, name="tasks", help="Tasks of the scheduler: submit, list, cancel, dead letters.")
    app.add_typer(tasks.schedules_app, name="schedules", help="Recurring tasks.")
    app.add_typer(tasks.workers_app, name="workers", help="Workers taking tasks.")


register_domains()


def main() -> None:
    app()
