"""`baaaht-ctl chat [SESSION]`: a conversation with the session's assistant in the terminal.

Each line typed is a user message; the answer streams as the assistant generates it (tool calls and
their results one line each). Ctrl-C during an answer cancels the turn (`session.cancel`); a second
Ctrl-C, Ctrl-C at the prompt, or end of input (Ctrl-D) leaves. The session stays open: `chat SESSION`
comes back to it.
"""

from __future__ import annotations

import getpass
from typing import Optional

import typer

from baaaht.bus.errors import BusError
from baaaht.common.units import parse_duration
from baaaht.ctl.common import Ctl, fail, option_value
from baaaht.ctl.conversation import Conversation, Follower
from baaaht.schemas.bus import BusStats
from baaaht.schemas.sessions import SessionCancel, SessionCreate, SessionGet, SessionSendMessage, SessionState

PROMPT = "you> "
CANCEL_WAIT = 30.0  # seconds a cancelled turn gets to end before the prompt comes back anyway
WAIT_STEP = 0.2  # seconds between looks while waiting (Ctrl-C lands between them)


def chat(
    ctx: typer.Context,
    session_id: Optional[str] = typer.Argument(None, metavar="[SESSION]", help="Session id (default: new)."),
    name: str = typer.Option("chat", "--name", help="Name of the session created when none is given."),
    turn_timeout: str = typer.Option("10m", "--turn-timeout", help="How long one answer may take."),
) -> None:
    """Talk with the session's assistant (a new session when none is given). Ctrl-C cancels the
    current answer; a second Ctrl-C, or Ctrl-D, leaves."""
    ctl: Ctl = ctx.obj
    limit = float(option_value("--turn-timeout", turn_timeout, parse_duration))
    since = ctl.call(BusStats()).last_event_seq
    if session_id is None:
        session = ctl.call(SessionCreate(owner=getpass.getuser(), name=name))
        typer.echo(f"session {session.id} (come back with `baaaht-ctl chat {session.id}`)", err=True)
    else:
        session = ctl.call(SessionGet(session_id=session_id))
        if session.state in (SessionState.CLOSING, SessionState.CLOSED):
            fail(f"session {session.id} is {session.state.value}: start another with `baaaht-ctl chat`")
    view = Conversation(echo_user=False)
    follower = Follower(ctl.client, session.id, since, view).start()
    try:
        converse(ctl, session.id, view, follower, limit)
    finally:
        follower.stop()
    if isinstance(follower.error, BusError):
        ctl.explain(follower.error)


def converse(ctl: Ctl, session_id: str, view: Conversation, follower: Follower, limit: float) -> None:
    """Prompt, send, show the answer; until the user leaves or the session closes."""
    while not follower.done.is_set():
        try:
            text = input(PROMPT)
        except (EOFError, KeyboardInterrupt):
            typer.echo("", err=True)
            return
        if not text.strip():
            continue
        message = ctl.call(SessionSendMessage(session_id=session_id, content=text))
        try:
            if not wait_turn(view, message.id, limit):
                typer.echo(f"(no answer within {limit:g}s: it may still come)", err=True)
        except KeyboardInterrupt:
            try:  # a second Ctrl-C, wherever it lands while the turn is cancelled, leaves
                typer.echo("\n(cancelling: Ctrl-C again leaves)", err=True)
                ctl.call(SessionCancel(session_id=session_id, reason="Ctrl-C in baaaht-ctl chat"))
                wait_turn(view, message.id, CANCEL_WAIT)
            except KeyboardInterrupt:
                typer.echo("", err=True)
                return
    typer.echo("session closed", err=True)


def wait_turn(view: Conversation, message_id: str, limit: float) -> bool:
    """Whether the turn answering the message ended within `limit` seconds (in short waits, so that
    Ctrl-C is taken at once)."""
    ended = view.expect(message_id)
    for _ in range(max(1, int(limit / WAIT_STEP))):
        if ended.wait(WAIT_STEP):
            return True
    return False
