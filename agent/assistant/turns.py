"""The assistant's loop: answer each user message of its session, once, as the model and its tools do.

One turn per user message, one turn at a time, oldest first. A turn: the context (the conversation
cut to the budget), the model streamed (each piece published as a `session.partial` event), its
message stored before any tool it asked for runs, the tools run as scheduler tasks (in parallel),
each answered (result, error or cancellation) and stored, again until the model stops or a cap is
reached. What is stored is the record: a turn cut short by a restart is taken up again from it
(the tool tasks' idempotency keys make a resubmitted call the same task), a finished one is never
answered again. See docs/ASSISTANT.md.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

from baaaht.agent.assistant.config import AssistantConfig
from baaaht.agent.assistant.context import dropped_note, fit, is_stop, shown_messages, turns_of, unanswered
from baaaht.agent.assistant.model import (
    Finished,
    Model,
    ModelReply,
    ModelRequest,
    ProviderError,
    TextDelta,
    ToolCallReady,
)
from baaaht.schemas.base import topic_of
from baaaht.schemas.sessions import (
    Message,
    MessageMetadata,
    MessageToolCall,
    SessionCancelled,
    SessionMessage,
    SessionMessages,
    SessionPartial,
    SessionSendMessage,
    TurnEnd,
)
from baaaht.schemas.tools import tool_schemas

log = logging.getLogger("baaaht.agent.assistant")
CANCEL_TOPIC = topic_of(SessionCancelled)  # `session.cancel/<S>`: stop what runs (session service)
SYSTEM_PROMPT = (
    "You are the assistant of a baaaht session. You work in the session's workspace through the tools "
    "you are given: they run in a sandboxed worker container of this session. Answer the user plainly; "
    "use tools when the answer needs the workspace or a command."
)
CANCELLED = "cancelled: the turn was stopped"
TEXT_INTERVAL = 0.02  # seconds between two text partials: at most 50 a second, well in an agent's budget
LIMIT_TOOL_CALLS = "not run: the limit of {limit} tool calls for one user message is reached"


@dataclass(frozen=True)
class ToolAnswer:
    content: str
    is_error: bool = False


class ToolRunner(Protocol):
    async def run(self, turn_id: str, call: MessageToolCall, output: "Partials") -> ToolAnswer:
        """Run one tool call to its end; never raises for the tool's own failure (that is an answer)."""
        ...

    async def cancel(self, turn_id: str, call: MessageToolCall) -> None:
        """Cancel the call's task if it was submitted (best effort: the answer says cancelled anyway)."""
        ...


class Bus(Protocol):  # what the assistant needs of agent/sdk.py Agent
    async def call(self, request: Any, timeout: float | None = None) -> Any: ...
    async def publish(self, event: Any) -> None: ...
    def stream(self, request: Any, timeout: float | None = None) -> Any: ...
    def subscribe(self, topics: list[str] | None = None, since: int | None = None) -> Any: ...


@dataclass
class Partials:
    """The `session.partial` events of one turn, numbered from 1. Model text is coalesced: the first
    piece goes at once, later ones at most every `text_interval` seconds (a fast model streams more
    pieces a second than an agent may publish events: limits.agent_events_per_second)."""

    bus: Bus
    session_id: str
    turn_id: str
    text_interval: float = TEXT_INTERVAL
    seq: int = 0
    _text: str = ""  # model text not published yet
    _last_text: float = -math.inf
    _flusher: asyncio.Task | None = None

    async def text(self, piece: str) -> None:
        self._text += piece
        if self._flusher is not None:
            return  # published with the pieces before it, when the interval is over
        wait = self._last_text + self.text_interval - time.monotonic()
        if wait <= 0:
            await self._send_text()
        else:
            self._flusher = asyncio.create_task(self._send_text_after(wait))

    async def flush(self) -> None:
        """Publish the model text held back (before anything else of the turn, or at its end)."""
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        await self._send_text()

    async def publish(self, kind: str, text: str = "", tool_call_id: str = "") -> None:
        await self.flush()
        await self._send(kind, text, tool_call_id)

    async def _send_text_after(self, wait: float) -> None:
        await asyncio.sleep(wait)
        self._flusher = None
        await self._send_text()

    async def _send_text(self) -> None:
        if self._text:
            text, self._text, self._last_text = self._text, "", time.monotonic()
            await self._send("text", text)

    async def _send(self, kind: str, text: str, tool_call_id: str = "") -> None:
        self.seq += 1
        event = SessionPartial(
            session_id=self.session_id,
            turn_id=self.turn_id,
            seq=self.seq,
            kind=kind,
            text=text,
            tool_call_id=tool_call_id,
        )
        await self.bus.publish(event)


@dataclass
class TurnState:
    """What a running turn has done, for whoever must close it after a cancel."""

    user: Message
    turn_id: str
    partials: Partials
    text: str = ""  # of the model answer streaming now
    open_calls: list[MessageToolCall] = field(default_factory=list)  # stored, not yet answered


class Assistant:
    def __init__(
        self,
        bus: Bus,
        session_id: str,
        model: Model,
        tools: ToolRunner,
        config: AssistantConfig,
        sleep=asyncio.sleep,
    ):
        self.bus, self.session_id, self.model, self.tools, self.config = bus, session_id, model, tools, config
        self.sleep = sleep
        self.messages: dict[str, Message] = {}
        self._changed = asyncio.Event()
        self._cancel_upto = 0  # user messages up to this seq are not to be answered (session.cancel)
        self._running: asyncio.Task | None = None
        self._state: TurnState | None = None
        self._cancel_asked = False
        self.tool_definitions = tool_schemas()

    # -- serving ---------------------------------------------------------------------------------

    async def serve(self) -> None:
        """Answer the session's user messages until cancelled: those without an answer first (sent
        while the assistant was away), then each as it arrives."""
        followers = [
            asyncio.create_task(self._follow_messages(), name="assistant-messages"),
            asyncio.create_task(self._follow_cancels(), name="assistant-cancels"),
        ]
        try:
            await self._read_history()
            while True:
                for follower in followers:
                    if follower.done():
                        follower.result()  # a follower that failed ends the assistant
                user = self._next_user()
                if user is None:
                    self._changed.clear()
                    await self._wait_changed(followers)
                    continue
                await self._turn(user)
        finally:
            for follower in followers:
                follower.cancel()

    async def _wait_changed(self, followers: list[asyncio.Task]) -> None:
        changed = asyncio.create_task(self._changed.wait())
        try:
            await asyncio.wait([changed, *followers], return_when=asyncio.FIRST_COMPLETED)
        finally:
            changed.cancel()

    async def _read_history(self) -> None:
        cursor = 0
        while True:
            page = await self.bus.call(SessionMessages(session_id=self.session_id, cursor=cursor, limit=1000))
            for message in page.messages:
                self._learn(message)
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    async def _follow_messages(self) -> None:
        # From the start of the broker's history: a message sent while the assistant was joining is seen.
        async for delivery in self.bus.subscribe([topic_of(SessionMessage)], since=0):
            event = delivery.event
            if isinstance(event, SessionMessage) and event.session_id == self.session_id:
                self._learn(event.message)

    async def _follow_cancels(self) -> None:
        # From now on only: a cancel of an earlier life of this assistant is history, not an order.
        async for delivery in self.bus.subscribe([CANCEL_TOPIC]):
            if delivery.topic.partition("/")[0] == CANCEL_TOPIC:
                self._cancel_upto = max([self._cancel_upto, *(m.seq for m in self.messages.values())])
                log.info("session cancel", extra={"session_id": self.session_id, "upto": self._cancel_upto})
                self._cancel_running()
                self._changed.set()

    def _learn(self, message: Message) -> None:
        if message.id in self.messages:
            return
        self.messages[message.id] = message
        if is_stop(message):
            self._cancel_running(before_seq=message.seq)
        self._changed.set()

    def _next_user(self) -> Message | None:
        waiting = unanswered(list(self.messages.values()))
        return waiting[0] if waiting else None

    def _stopped(self, user: Message) -> bool:
        """Whether a cancel came after `user` was sent: a session.cancel, or a later `/stop`."""
        return user.seq <= self._cancel_upto or any(
            is_stop(m) and m.seq > user.seq for m in self.messages.values()
        )

    def _cancel_running(self, before_seq: int | None = None) -> None:
        state, running = self._state, self._running
        if state is None or running is None or running.done():
            return
        if before_seq is not None and state.user.seq > before_seq:
            return
        self._cancel_asked = True
        running.cancel()

    # -- one turn --------------------------------------------------------------------------------

    async def _turn(self, user: Message) -> None:
        own = next(
            t for t in turns_of(list(self.messages.values())) if t.user is not None and t.user.id == user.id
        ).own
        turn_id = own[0].metadata.turn_id if own else uuid.uuid4().hex
        state = TurnState(user, turn_id, Partials(self.bus, self.session_id, turn_id))
        if self._stopped(user):
            await self._end(state, "Cancelled before it was answered.", "cancelled", is_error=True)
            return
        self._state, self._cancel_asked = state, False
        self._running = asyncio.create_task(self._answer(state), name=f"assistant-turn-{turn_id}")
        try:
            await asyncio.wait([self._running])
        finally:
            if not self._running.done():  # the assistant itself is stopping: the record resumes the turn
                self._running.cancel()
        running, self._running, self._state = self._running, None, None
        if running.cancelled() and self._cancel_asked:
            await self._close_cancelled(state)
        elif not running.cancelled() and running.exception() is not None:
            error = running.exception()
            log.error("turn failed", extra={"turn_id": turn_id, "error": repr(error)})
            await self._end(state, f"The assistant failed while answering: {error}", "failed", is_error=True)

    async def _answer(self, state: TurnState) -> None:
        user = state.user
        own = self._own(user)
        model_calls = sum(1 for m in own if m.role == "assistant" and not m.metadata.is_error)
        tool_calls = sum(len(m.metadata.tool_calls) for m in own)
        state.open_calls = _unanswered_calls(own)
        while True:
            if state.open_calls:
                await self._run_tools(state)
                continue
            if model_calls >= self.config.max_turns:
                limit = self.config.max_turns
                text = f"Stopped: the limit of {limit} model calls for one user message is reached."
                await self._end(state, text, "limit", is_error=True)
                return
            try:
                reply = await self._ask_model(state)
            except ProviderError as error:
                await state.partials.publish("status", f"model call failed: {error.kind}: {error}")
                await self._end(state, explain(error, self.config), "failed", is_error=True)
                return
            model_calls += 1
            allowed = max(0, self.config.max_tool_calls - tool_calls)
            tool_calls += len(reply.tool_calls)
            message = await self._store(
                state,
                "assistant",
                reply.text,
                tool_calls=reply.tool_calls,
                turn_end="" if reply.tool_calls else "done",
            )
            state.text = ""
            state.open_calls = list(message.metadata.tool_calls)
            for call in state.open_calls[allowed:]:
                await self._store_answer(
                    state, call, ToolAnswer(LIMIT_TOOL_CALLS.format(limit=self.config.max_tool_calls), True)
                )
            if not reply.tool_calls:
                return

    def _own(self, user: Message) -> list[Message]:
        return sorted(
            (m for m in self.messages.values() if m.metadata.reply_to == user.id), key=lambda m: m.seq
        )

    def _request(self, user: Message) -> ModelRequest:
        turns = turns_of(list(self.messages.values()))
        upto = next(i for i, t in enumerate(turns) if t.user is not None and t.user.id == user.id)
        context = fit(turns[: upto + 1], self.config.context_budget)
        system = "\n\n".join(
            p for p in (self.config.system_prompt or SYSTEM_PROMPT, dropped_note(context)) if p
        )
        return ModelRequest(system=system, messages=shown_messages(context), tools=self.tool_definitions)

    async def _ask_model(self, state: TurnState) -> ModelReply:
        """The model's answer, streamed as partials; 429, 5xx and cut streams retried with backoff."""
        request = self._request(state.user)
        attempt = 0
        while True:
            reply, state.text = ModelReply(), ""
            try:
                async for event in self.model.stream(request):
                    if isinstance(event, TextDelta):
                        reply.text += event.text
                        state.text = reply.text
                        await state.partials.text(event.text)
                    elif isinstance(event, ToolCallReady):
                        reply.tool_calls.append(event.call)
                        await state.partials.publish(
                            "tool_call", f"{event.call.name} {event.call.arguments}", event.call.id
                        )
                    elif isinstance(event, Finished):
                        reply.stop_reason = event.stop_reason
                await state.partials.flush()
                return reply
            except ProviderError as error:
                if not error.retryable or attempt == self.config.retries:
                    raise
                delay = min(self.config.max_retry_delay, self.config.retry_delay * 2**attempt)
                log.warning(
                    "model call failed, retrying",
                    extra={"kind": error.kind, "error": str(error), "delay": delay},
                )
                await state.partials.publish(
                    "status",
                    f"retrying in {delay:g}s ({attempt + 1} of {self.config.retries}): {error.kind}: {error}",
                )
                await self.sleep(delay)
                attempt += 1

    async def _run_tools(self, state: TurnState) -> None:
        calls = list(state.open_calls)

        async def one(call: MessageToolCall) -> None:
            answer = await self.tools.run(state.turn_id, call, state.partials)
            await self._store_answer(state, call, answer)

        await asyncio.gather(*(one(call) for call in calls))

    async def _store_answer(self, state: TurnState, call: MessageToolCall, answer: ToolAnswer) -> None:
        await state.partials.publish("tool_result", answer.content[:1000], call.id)
        await self._store(state, "tool", answer.content, call=call, is_error=answer.is_error)
        state.open_calls = [c for c in state.open_calls if c.id != call.id]

    async def _close_cancelled(self, state: TurnState) -> None:
        """After a cancel: the tool tasks cancelled, every open call answered, the turn ended."""
        await asyncio.gather(*(self.tools.cancel(state.turn_id, call) for call in state.open_calls))
        for call in list(state.open_calls):
            await self._store_answer(state, call, ToolAnswer(CANCELLED, True))
        await state.partials.publish("status", "cancelled")
        text = f"{state.text}\n\n[cancelled]" if state.text else "Cancelled."
        await self._end(state, text, "cancelled", is_error=True)

    async def _end(self, state: TurnState, text: str, how: TurnEnd, is_error: bool) -> None:
        await self._store(state, "assistant", text, turn_end=how, is_error=is_error)

    async def _store(
        self,
        state: TurnState,
        role: str,
        content: str,
        *,
        tool_calls: list[MessageToolCall] = (),
        call: MessageToolCall | None = None,
        is_error: bool = False,
        turn_end: TurnEnd = "",
    ) -> Message:
        metadata = MessageMetadata(
            turn_id=state.turn_id,
            reply_to=state.user.id,
            tool_calls=list(tool_calls),
            tool_call_id=call.id if call else "",
            tool_name=call.name if call else "",
            is_error=is_error,
            turn_end=turn_end,
        )
        message = await self.bus.call(
            SessionSendMessage(session_id=self.session_id, role=role, content=content, metadata=metadata)
        )
        self._learn(message)
        return message


def _unanswered_calls(own: list[Message]) -> list[MessageToolCall]:
    answered = {m.metadata.tool_call_id for m in own if m.role == "tool"}
    return [c for m in own if m.role == "assistant" for c in m.metadata.tool_calls if c.id not in answered]


def explain(error: ProviderError, config: AssistantConfig) -> str:
    """What the user is told when the model cannot answer: what happened and what to configure."""
    route, provider = config.route_name, config.provider
    add = f"`baaaht-ctl credentials add {provider} --kind api-key`"
    if error.kind == "refused" and error.refused == "route":
        return (
            f"I cannot reach my model: the egress proxy has no route `{route}` open to this assistant "
            f"({error}). Configure it: a route named `{route}` under `egress.routes` in the host config "
            f"(docs/EGRESS.md), open to the assistant role, and its credential: {add}."
        )
    if error.kind == "refused" and error.refused == "credential":
        return (
            f"I cannot reach my model: the credential of the egress route `{route}` is missing or expired "
            f"({error}). Add it: {add}."
        )
    if error.kind == "refused" and error.refused in ("role", "session"):
        return (
            f"I cannot reach my model: the egress route `{route}` is not open to this assistant ({error}). "
            f"Open it: the route's `roles` must list `assistant` (and its `sessions` this session, or `*`)."
        )
    if error.kind == "refused":
        return f"I cannot reach my model: the egress proxy refused the call ({error.refused}: {error})."
    if error.kind == "auth":
        return (
            f"The {provider} API refused the credential (HTTP {error.status}): {error}. Check the key: {add}."
        )
    retried = f" after {config.retries} retries" if error.retryable else ""
    status = f", HTTP {error.status}" if error.status else ""
    return f"The model call failed{retried} ({error.kind}{status}): {error}"
