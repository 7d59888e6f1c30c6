"""`baaaht-ctl sessions ...` and `baaaht-ctl send SESSION TEXT`: sessions and their conversations."""

from __future__ import annotations

import getpass
import io
import sys
from typing import Annotated, Iterator, Optional

import typer

from baaaht.bus.errors import BusError
from baaaht.common.units import parse_duration
from baaaht.ctl.common import (
    Ctl,
    JsonOption,
    fail,
    interruptible,
    iso_time,
    json_line,
    key_values,
    option_value,
)
from baaaht.ctl.conversation import Conversation, Follower, conversation_topics
from baaaht.schemas.bus import BusStats
from baaaht.schemas.sessions import (
    Message,
    SessionCancel,
    SessionClose,
    SessionClosed,
    SessionCreate,
    SessionDelete,
    SessionGet,
    SessionInfo,
    SessionList,
    SessionMessage,
    SessionMessages,
    SessionSendMessage,
    SessionSettings,
    SessionState,
)

app = typer.Typer(no_args_is_help=True, add_completion=False)

PAGE = 1000  # the service's largest page
PREVIEW = 60  # characters of a message shown in a table


def session_row(session: SessionInfo) -> dict:
    return {
        "id": session.id,
        "state": session.state.value,
        "owner": session.owner,
        "name": session.name,
        "messages": session.message_count,
        "containers": len(session.containers),
        "created": iso_time(session.created_at),
        "last_activity": iso_time(session.last_activity_at),
    }


def message_row(message: Message) -> dict:
    text = message.content.replace("\n", " ")
    return {
        "seq": message.seq,
        "time": iso_time(message.time),
        "role": message.role,
        "sender": message.sender,
        "content": text if len(text) <= PREVIEW else text[: PREVIEW - 1] + "…",
    }


def seconds(option: str, text: Optional[str]) -> float:
    return 0.0 if text is None else float(option_value(option, text, parse_duration))


def all_messages(
    ctl: Ctl, session_id: str, newest_first: bool = False, limit: int | None = None
) -> Iterator[Message]:
    """The conversation page by page, up to `limit` messages (all when None)."""
    cursor, shown = 0, 0
    while True:
        size = PAGE if limit is None else min(PAGE, limit - shown)
        order = "newest" if newest_first else "oldest"
        page = ctl.call(SessionMessages(session_id=session_id, order=order, limit=size, cursor=cursor))
        yield from page.messages
        shown += len(page.messages)
        cursor = page.next_cursor
        if not cursor or (limit is not None and shown >= limit):
            return


@app.command("list")
def list_sessions(
    ctx: typer.Context,
    state_filter: Annotated[
        Optional[list[SessionState]], typer.Option("--state", "-s", help="Only these states (repeatable).")
    ] = None,
    owner: str = typer.Option("", "--owner", help="Only this owner's sessions."),
    label: Annotated[
        Optional[list[str]], typer.Option("--label", "-l", help="KEY=VALUE that must match (repeatable).")
    ] = None,
    limit: int = typer.Option(100, "--limit", min=1, help="At most this many sessions, oldest first."),
    _json: JsonOption = False,
) -> None:
    """Sessions, oldest first."""
    ctl: Ctl = ctx.obj
    found: list[SessionInfo] = []
    cursor = 0
    while len(found) < limit:
        page = ctl.call(
            SessionList(
                states=state_filter or [],
                owner=owner,
                labels=key_values("--label", label),
                limit=min(PAGE, limit - len(found)),
                cursor=cursor,
            )
        )
        found += page.sessions
        if not (cursor := page.next_cursor):
            break
    ctl.emit(found if ctl.json else [session_row(s) for s in found])


@app.command()
def get(
    ctx: typer.Context, session_id: str = typer.Argument(..., help="Session id."), _json: JsonOption = False
) -> None:
    """One session: state, limits, containers and clocks."""
    ctx.obj.emit(ctx.obj.call(SessionGet(session_id=session_id)))


@app.command()
def create(
    ctx: typer.Context,
    owner: str = typer.Option("", "--owner", help="Who the session is for (default: you)."),
    name: str = typer.Option("", "--name"),
    description: str = typer.Option("", "--description"),
    label: Annotated[
        Optional[list[str]], typer.Option("--label", "-l", help="KEY=VALUE (repeatable).")
    ] = None,
    tag: Annotated[Optional[list[str]], typer.Option("--tag", help="Repeatable.")] = None,
    max_containers: int = typer.Option(0, "--max-containers", min=0, help="0: the host limit."),
    max_duration: Optional[str] = typer.Option(None, "--max-duration", help="e.g. 2h; closed after it."),
    idle_timeout: Optional[str] = typer.Option(
        None, "--idle-timeout", help="e.g. 10m (default: the host's)."
    ),
    image: Annotated[
        Optional[list[str]], typer.Option("--image", help="An image the session may use (repeatable).")
    ] = None,
    _json: JsonOption = False,
) -> None:
    """Start a session."""
    ctl: Ctl = ctx.obj
    settings = SessionSettings(
        max_containers=max_containers,
        max_duration=seconds("--max-duration", max_duration),
        idle_timeout=seconds("--idle-timeout", idle_timeout),
        allowed_images=image or [],
    )
    request = SessionCreate(
        owner=owner or getpass.getuser(),
        name=name,
        description=description,
        labels=key_values("--label", label),
        tags=tag or [],
        settings=settings,
    )
    session = ctl.call(request)
    ctl.emit(session if ctl.json else session_row(session))


@app.command()
def close(
    ctx: typer.Context,
    session_id: str = typer.Argument(..., help="Session id."),
    reason: str = typer.Option("", "--reason"),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait until its containers are removed."),
    _json: JsonOption = False,
) -> None:
    """Close a session: its containers are stopped and removed. Closing a closed session is fine."""
    ctl: Ctl = ctx.obj
    session = ctl.call(
        SessionClose(session_id=session_id, reason=reason, wait=wait), timeout=max(ctl.timeout, 60.0)
    )
    if ctl.json:
        ctl.emit(session)
        return
    ctl.emit(session_row(session))
    if session.state is SessionState.CLOSING and wait:
        typer.echo(
            "still removing its containers: `baaaht-ctl sessions get` shows when it is closed", err=True
        )


@app.command()
def cancel(
    ctx: typer.Context,
    session_id: str = typer.Argument(..., help="Session id."),
    reason: str = typer.Option("", "--reason"),
    _json: JsonOption = False,
) -> None:
    """Stop the session's current turn: its assistant stops generating and cancels its running tools."""
    ctl: Ctl = ctx.obj
    ctl.call(SessionCancel(session_id=session_id, reason=reason))
    if ctl.json:
        ctl.emit({"id": session_id, "cancel_requested": True})
    else:
        typer.echo(f"cancel requested for {session_id}", err=True)


@app.command()
def delete(
    ctx: typer.Context,
    session_id: str = typer.Argument(..., help="Session id."),
    _json: JsonOption = False,
) -> None:
    """Forget a closed session and its conversation (close it first)."""
    ctl: Ctl = ctx.obj
    ctl.call(SessionDelete(session_id=session_id))
    if ctl.json:
        ctl.emit({"id": session_id, "deleted": True})
    else:
        typer.echo(f"deleted {session_id}", err=True)


@app.command()
def messages(
    ctx: typer.Context,
    session_id: str = typer.Argument(..., help="Session id."),
    newest: bool = typer.Option(False, "--newest", help="Newest first."),
    limit: int = typer.Option(50, "--limit", min=1, help="At most this many messages."),
    _json: JsonOption = False,
) -> None:
    """A session's conversation (contents shortened in the table; --json or export for all of it)."""
    ctl: Ctl = ctx.obj
    found = list(all_messages(ctl, session_id, newest_first=newest, limit=limit))
    ctl.emit(found if ctl.json else [message_row(m) for m in found])


@app.command()
def export(
    ctx: typer.Context,
    session_id: str = typer.Argument(..., help="Session id."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="File to write (default: stdout)."),
) -> None:
    """The whole conversation as JSON lines, oldest first: one message per line."""
    ctl: Ctl = ctx.obj
    ctl.call(SessionGet(session_id=session_id))  # an unknown id is an error, not an empty file
    try:
        target = open(output, "x", encoding="utf-8") if output else sys.stdout
    except OSError as exc:
        fail(f"cannot write {output}: {exc.strerror}")
    try:
        for message in all_messages(ctl, session_id):
            json_line(message, target)
    finally:
        if output:
            target.close()


@app.command()
def watch(
    ctx: typer.Context,
    session_id: str = typer.Argument(..., help="Session id."),
    history: int = typer.Option(10, "--history", min=0, help="First show this many recent messages."),
    _json: JsonOption = False,
) -> None:
    """Follow a conversation live until the session closes (Ctrl-C stops): its messages, and the
    assistant's answers as they are generated (each tool call and result on one line)."""
    ctl: Ctl = ctx.obj
    since = ctl.call(BusStats()).last_event_seq  # events from here on are not missed
    session = ctl.call(SessionGet(session_id=session_id))
    if session.state is SessionState.CLOSED:
        fail(f"session {session_id} is closed: `baaaht-ctl sessions messages` shows its conversation")
    view = Conversation()
    shown = 0
    if history:
        for message in reversed(list(all_messages(ctl, session_id, newest_first=True, limit=history))):
            json_line(message) if ctl.json else view.message(message)
            shown = message.seq
    try:
        with interruptible(), ctl.client.subscribe(conversation_topics(session_id), since=since) as events:
            for delivery in events:
                event = delivery.event
                if isinstance(event, SessionMessage) and event.message.seq <= shown:
                    continue  # already in the history
                if isinstance(event, SessionClosed) and event.session_id != session_id:
                    continue
                json_line(event) if ctl.json else view.take(event, session_id)
                if isinstance(event, SessionClosed):
                    typer.echo(f"session closed: {event.reason}", err=True)
                    return
    except BusError as exc:
        ctl.explain(exc)


def send(
    ctx: typer.Context,
    session_id: str = typer.Argument(..., metavar="SESSION", help="Session id."),
    text: str = typer.Argument(
        ..., metavar="TEXT", help="The message; `-` reads it from stdin. After `--` it may start with `-`."
    ),
    wait: bool = typer.Option(False, "--wait", help="Wait for the assistant's answer and print it."),
    wait_timeout: str = typer.Option("10m", "--wait-timeout", help="How long --wait waits, e.g. 30s."),
    _json: JsonOption = False,
) -> None:
    """Append a user message to a session's conversation (`send S -- --looks-like-a-flag`); with --wait,
    print the assistant's answer once its turn ends (exit 1 when the turn failed or was cancelled)."""
    ctl: Ctl = ctx.obj
    content = sys.stdin.read() if text == "-" else text
    limit = seconds("--wait-timeout", wait_timeout)
    since = ctl.call(BusStats()).last_event_seq if wait else 0  # the answer's events are not missed
    message = ctl.call(SessionSendMessage(session_id=session_id, content=content))
    if not wait:
        ctl.emit(
            message if ctl.json else {"id": message.id, "seq": message.seq, "time": iso_time(message.time)}
        )
        return
    answer = wait_for_answer(ctl, session_id, message, since, limit)
    if ctl.json:
        ctl.emit(answer)
    else:
        typer.echo("\n".join(m.content for m in answer if m.role == "assistant" and m.content))
    ended = answer[-1].metadata.turn_end
    if ended != "done":
        fail(f"the turn ended {ended}: `baaaht-ctl sessions messages {session_id}` shows it all")


def wait_for_answer(ctl: Ctl, session_id: str, message: Message, since: int, limit: float) -> list[Message]:
    """The messages answering `message` once its turn has ended; fails after `limit` seconds."""
    view = Conversation(io.StringIO())  # shows nothing: only the answer is printed
    ended = view.expect(message.id)
    follower = Follower(ctl.client, session_id, since, view).start()
    try:
        with interruptible():
            if not ended.wait(limit):
                fail(
                    f"no answer within {limit:g}s (--wait-timeout); it may still come: "
                    f"`baaaht-ctl sessions watch {session_id}`"
                )
    finally:
        follower.stop()
    if isinstance(follower.error, BusError):
        ctl.explain(follower.error)
    answer = view.answer(message.id)
    if not answer or not answer[-1].metadata.turn_end:
        fail(f"no answer: session {session_id} closed, or the wait was interrupted")
    return answer
