"""A session's conversation as people follow it: `sessions watch`, `send --wait` and `chat`.

The assistant streams each turn as `session.partial` events (text as it is generated, tool calls and
their results, status lines) and stores its messages (`session.message`). Partials are shown as they
come; a stored message of a turn already streamed is not shown again, only how its turn ended.
"""

from __future__ import annotations

import sys
import threading
from typing import TextIO

from baaaht.ctl.common import iso_time, visible
from baaaht.schemas.base import session_topic
from baaaht.schemas.sessions import Message, SessionClosed, SessionMessage, SessionPartial

TOOL_PREVIEW = 100  # characters of a tool call or result shown on its line
MARKS = {"tool_call": "→", "tool_result": "←", "status": "·"}


def conversation_topics(session_id: str) -> list[str]:
    return [
        session_topic(SessionMessage, session_id),
        session_topic(SessionPartial, session_id),
        "session.closed",
    ]


def one_line(text: str, limit: int = TOOL_PREVIEW) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def message_line(message: Message) -> str:
    return f"[{iso_time(message.time)}] #{message.seq} {message.role}: {message.content}"


class Conversation:
    """Writes a conversation's events to `out` for people; thread-safe, so a follower thread may feed it
    while another waits for a turn (`expect`, `answer`). With `echo_user` off, user messages are not
    shown (`chat`: the user typed them)."""

    def __init__(self, out: TextIO | None = None, echo_user: bool = True):
        self.out = out or sys.stdout
        self.echo_user = echo_user
        self._streamed: set[str] = set()  # turns whose partials were shown
        self._open_turn = ""  # the turn whose text is being written on the current line
        self._turns: dict[str, list[Message]] = {}  # user message id -> the answer's messages so far
        self._ended: dict[str, threading.Event] = {}  # user message id -> set once its turn ended
        self._lock = threading.Lock()

    # -- what a caller waits for -----------------------------------------------------------------------

    def expect(self, message_id: str) -> threading.Event:
        """The event set once the turn answering this user message has ended."""
        with self._lock:
            return self._ended.setdefault(message_id, threading.Event())

    def answer(self, message_id: str) -> list[Message]:
        """The messages answering this user message, so far, oldest first."""
        with self._lock:
            return list(self._turns.get(message_id, []))

    # -- events ----------------------------------------------------------------------------------------

    def partial(self, partial: SessionPartial) -> None:
        with self._lock:
            self._streamed.add(partial.turn_id)
            if partial.kind == "text":
                if self._open_turn != partial.turn_id:
                    self._end_line()
                    self._write("assistant: ")
                    self._open_turn = partial.turn_id
                self._write(partial.text)
            else:
                self._end_line()
                self._write(f"  {MARKS[partial.kind]} {one_line(partial.text)}\n")
            self.out.flush()

    def message(self, message: Message) -> None:
        metadata = message.metadata
        with self._lock:
            if metadata.reply_to:
                self._turns.setdefault(metadata.reply_to, []).append(message)
            if self.echo_user or message.role != "user":
                if metadata.turn_id not in self._streamed:
                    self._end_line()
                    self._write(message_line(message) + "\n")
                elif metadata.turn_end and metadata.turn_end != "done":
                    self._end_line()
                    self._write(f"  · turn {metadata.turn_end}\n")
            if metadata.turn_end:
                self._end_line()
                if metadata.reply_to:
                    self._ended.setdefault(metadata.reply_to, threading.Event()).set()
            self.out.flush()

    def closed(self, event: SessionClosed | None) -> None:
        """The session closed (or the follower stopped): no turn waited for will end any more."""
        with self._lock:
            self._end_line()
            self.out.flush()
            for ended in self._ended.values():
                ended.set()  # nothing more will come

    def take(self, event: object, session_id: str) -> bool:
        """Show one event of the session's topics; False once the session has closed."""
        if isinstance(event, SessionPartial):
            self.partial(event)
        elif isinstance(event, SessionMessage):
            self.message(event.message)
        elif isinstance(event, SessionClosed) and event.session_id == session_id:
            self.closed(event)
            return False
        return True

    def _end_line(self) -> None:
        if self._open_turn:
            self._write("\n")
            self._open_turn = ""

    def _write(self, text: str) -> None:
        self.out.write(visible(text))


class Follower:
    """A thread feeding the session's conversation events, from bus event `since` on, to a Conversation
    until `stop()` or the session closes (`done` is set then, and when following failed: `error`)."""

    POLL = 0.2  # seconds between looks at `stop`

    def __init__(self, client, session_id: str, since: int, view: Conversation):
        self.client, self.session_id, self.since, self.view = client, session_id, since, view
        self.done = threading.Event()
        self.error: Exception | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="baaaht-ctl-follow", daemon=True)

    def start(self) -> "Follower":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(self.POLL * 10)

    def _run(self) -> None:
        try:
            with self.client.subscribe(conversation_topics(self.session_id), since=self.since) as events:
                while not self._stopping.is_set():
                    delivery = events.next(timeout=self.POLL)
                    if delivery is not None and not self.view.take(delivery.event, self.session_id):
                        return
        except Exception as exc:  # shown by the command, which is waiting on `done`
            self.error = exc
        finally:
            self.done.set()
            self.view.closed(None)
