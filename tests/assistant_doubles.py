"""A scripted stand-in for the session's assistant, for testing what the host and baaaht-ctl do around
it: an identified assistant on the agent socket (the kit's fake /proc) that answers each user message
of its session with the partials and messages a test scripts, and ends a turn `cancelled` on the
session's `session.cancel`."""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass, field

from baaaht.schemas.base import topic_of
from baaaht.schemas.sessions import (
    MessageMetadata,
    SessionCancelled,
    SessionMessage,
    SessionPartial,
    SessionSendMessage,
)

STEP = 0.05  # seconds between a scripted turn's steps (a cancel lands between them)


@dataclass
class Step:
    kind: str  # text, tool_call, tool_result, status: a partial; store: a stored message of the turn
    text: str


@dataclass
class ScriptedAssistant:
    """Answers every user message with `script` (its text steps stored at the end as the answer);
    `hold` keeps a turn going (streaming nothing more) until a cancel; `ignore_cancel` records cancels
    but goes on."""

    host: object
    session_id: str
    script: list[Step] = field(default_factory=list)
    hold: bool = False
    ignore_cancel: bool = False
    cancels: list[SessionCancelled] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.host.identify(self.session_id, role="assistant")
        self.client = self.host.agent_client()
        self._cancelled = threading.Event()
        self._stopping = threading.Event()
        self.ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="scripted-assistant", daemon=True)
        self._thread.start()
        assert self.ready.wait(10), "the scripted assistant did not subscribe"

    def stop(self) -> None:
        self._stopping.set()
        self._cancelled.set()
        self._thread.join(10)

    def _serve(self) -> None:
        topics = [topic_of(SessionMessage), topic_of(SessionCancelled)]
        with self.client.subscribe(topics, since=0) as events:
            self.ready.set()
            while not self._stopping.is_set():
                delivery = events.next(timeout=0.1)
                if delivery is None:
                    continue
                event = delivery.event
                if isinstance(event, SessionMessage) and event.message.role == "user":
                    self._turn(event.message.id, events)

    def _turn(self, reply_to: str, events) -> None:
        turn_id = secrets.token_hex(8)
        answer: list[str] = []
        seq = 0
        for step in self.script:
            if self._cancel_seen(events):
                return self._store(turn_id, reply_to, "".join(answer), "cancelled")
            if step.kind == "store":
                self._store(turn_id, reply_to, "".join(answer), "")
                answer = []
                continue
            seq += 1
            partial = SessionPartial(
                session_id=self.session_id, turn_id=turn_id, seq=seq, kind=step.kind, text=step.text
            )
            self.client.publish(partial)
            if step.kind == "text":
                answer.append(step.text)
        while self.hold and not self._cancel_seen(events):
            pass
        if not self._stopping.is_set():
            self._store(turn_id, reply_to, "".join(answer), "cancelled" if self.hold else "done")

    def _cancel_seen(self, events) -> bool:
        """Whether a cancel came (one the assistant obeys: not with `ignore_cancel`) or it is stopping."""
        delivery = events.next(timeout=STEP)
        if delivery is not None and isinstance(delivery.event, SessionCancelled):
            self.cancels.append(delivery.event)
            return not self.ignore_cancel
        return self._stopping.is_set()

    def _store(self, turn_id: str, reply_to: str, content: str, turn_end: str) -> None:
        metadata = MessageMetadata(turn_id=turn_id, reply_to=reply_to, turn_end=turn_end)
        self.client.call(
            SessionSendMessage(
                session_id=self.session_id, role="assistant", content=content, metadata=metadata
            )
        )
