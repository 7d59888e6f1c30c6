"""baaaht-ctl: the operator's CLI and bus inspector."""

from __future__ import annotations

import sys
import time
from typing import Optional

import msgspec
import orjson
import typer

from baaaht.bus.errors import BusError
from baaaht.ctl import common
from baaaht.ctl.common import call, emit, fail, state
from baaaht.schemas.base import Request, known_types
from baaaht.schemas.bus import EventsReplay, Ping, ServicesQuery, StatsQuery

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Operate a baaaht host. `--json` (anywhere on the line) prints JSON for scripts.",
)


@app.callback()
def options(
    config: Optional[str] = typer.Option(
        None, "--config", "-c", help="Config file (YAML or JSON).", envvar="BAAAHT_CONFIG"
    ),
    timeout: float = typer.Option(5.0, "--timeout", help="Seconds to wait for the bus."),
) -> None:
    state.config_path = config
    state.timeout = timeout


@app.command()
def ping() -> None:
    """Round trip to the broker."""
    started = time.perf_counter()
    pong = call(Ping())
    elapsed_ms = (time.perf_counter() - started) * 1000
    if state.json:
        emit({"rtt_ms": elapsed_ms, **common.to_builtins(pong)})
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
def services(name: str = typer.Argument("", help="Only this service.")) -> None:
    """Registered services, their instances, health and load."""
    result = call(ServicesQuery(service=name))
    emit(result.services if state.json else instance_rows(result.services))


@app.command()
def status() -> None:
    """Is the host up: the broker, its services and its counters."""
    pong = call(Ping())
    listed = call(ServicesQuery()).services
    stats = call(StatsQuery())
    healthy = all(i.healthy for s in listed for i in s.instances)
    if state.json:
        emit({"broker": pong, "services": listed, "stats": stats, "healthy": healthy})
        return
    typer.echo(
        f"broker   pid {pong.broker_pid}, up {stats.uptime:.0f}s, {stats.messages_in} messages in, "
        f"{sum(stats.errors.values())} errors, last event #{stats.last_event_seq}"
    )
    typer.echo(
        common.table(instance_rows(listed), ["service", "instance", "pid", "healthy", "in_flight", "served"])
    )
    if not healthy:
        raise typer.Exit(common.EXIT_ERROR)


@app.command()
def stats() -> None:
    """Broker counters: messages, bytes, errors by code, per service."""
    emit(call(StatsQuery()))


@app.command("call")
def call_command(
    target: str = typer.Argument(..., help="service.method, e.g. session.get"),
    body: str = typer.Argument("{}", help="The request as JSON."),
    stream: bool = typer.Option(False, "--stream", help="The method streams: print each partial result."),
) -> None:
    """Call any method with a JSON body; the result is printed as JSON."""
    encoded = encode_request(target, body)
    if stream:
        request_type = known_types().get(target)
        if request_type is None:
            fail(f"--stream needs a known request type; {target!r} is not one (baaaht-ctl schema lists them)")
        for item in common.stream(msgspec.msgpack.decode(encoded, type=request_type)):
            print_json(item)
        return
    try:
        result = state.client.call_raw(target, encoded)
    except BusError as exc:
        common.explain(exc)
    print_json(msgspec.msgpack.decode(result))


def encode_request(target: str, body: str) -> bytes:
    """Validate against the schema when the target is known, so mistakes are named before sending."""
    request_type = known_types().get(target)
    try:
        if isinstance(request_type, type) and issubclass(request_type, Request):
            return msgspec.msgpack.encode(msgspec.json.decode(body, type=request_type))
        return msgspec.msgpack.encode(orjson.loads(body))
    except (msgspec.DecodeError, orjson.JSONDecodeError) as exc:
        fail(f"invalid request body for {target}: {exc}")


def print_json(value) -> None:
    sys.stdout.write(orjson.dumps(common.to_builtins(value), option=orjson.OPT_INDENT_2).decode() + "\n")


@app.command()
def events(
    topic: list[str] = typer.Option([], "--topic", "-t", help="Topic prefix (repeatable)."),
    since: Optional[int] = typer.Option(
        None, "--since", help="Replay kept events after this sequence number."
    ),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing live events (Ctrl-C ends)."),
    limit: int = typer.Option(50, "--limit", help="Without --since: how many recent events to show."),
) -> None:
    """Show events: recent or since a sequence number, and live with --follow."""
    if since is None:
        last = call(StatsQuery()).last_event_seq
        since = max(0, last - limit)
    if not follow:
        for event in call(EventsReplay(since=since, topics=topic, limit=max(limit, 1))).events:
            show_event(event.seq, event.time, event.topic, event.source, bytes(event.body))
        return
    try:
        with state.client.subscribe(topic, since=since) as subscription:
            for delivery in subscription:
                show_event(delivery.seq, delivery.time, delivery.topic, delivery.source, delivery.body)
    except BusError as exc:
        common.explain(exc)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)


def show_event(seq: int, at: float, topic: str, source: str, body: bytes) -> None:
    try:
        payload = msgspec.msgpack.decode(body)
    except msgspec.DecodeError:
        payload = body.hex()
    if state.json:
        record = {"seq": seq, "time": at, "topic": topic, "source": source, "event": payload}
        sys.stdout.write(orjson.dumps(record).decode() + "\n")
    else:
        stamp = time.strftime("%H:%M:%S", time.localtime(at)) + f".{int(at % 1 * 1000):03d}"
        typer.echo(f"{seq:>6}  {stamp}  {topic:<28}  {source:<12}  {orjson.dumps(payload).decode()}")
    sys.stdout.flush()


@app.command()
def schema(name: str = typer.Argument("", help="A type name or tag, e.g. session.create.")) -> None:
    """List the wire types, or print one type's JSON Schema."""
    types = known_types()
    if not name:
        rows = sorted(
            (
                {"tag": t.__struct_config__.tag or "-", "type": t.__name__, "role": role_of(t)}
                for t in set(types.values())
            ),
            key=lambda r: (r["role"], r["tag"], r["type"]),
        )
        emit(rows)
        return
    found = types.get(name)
    if found is None:
        fail(f"unknown schema type {name!r} (baaaht-ctl schema lists them)")
    print_json(msgspec.json.schema(found))


def role_of(cls: type) -> str:
    return next(base.__name__.lower() for base in cls.__mro__ if base.__module__.endswith("schemas.base"))


def register_domains() -> None:
    """The domain command groups live beside their services' schemas."""
    from baaaht.ctl import config_cmd, containers, policy, sessions

    app.add_typer(config_cmd.app, name="config", help="The effective configuration.")
    app.add_typer(containers.app, name="containers", help="Containers on this host.")
    app.add_typer(sessions.app, name="sessions", help="Sessions and their conversations.")
    app.add_typer(policy.app, name="policy", help="The container policy.")
    app.add_typer(policy.audit_app, name="audit", help="The policy decision audit log.")
    app.command("send")(sessions.send)


register_domains()


def main() -> None:
    # `--json` works anywhere on the line, as people type it after the command.
    if "--json" in sys.argv[1:]:
        sys.argv.remove("--json")
        state.json = True
    try:
        app()
    finally:
        state.close()
