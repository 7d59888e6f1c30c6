"""The assistant's turn loop (pure: asyncio against a fake session bus, a scripted model and fake
tools): what it stores and streams, in which order, once; restarts, cancels, errors, caps."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from baaaht.agent.assistant.config import AssistantConfig
from baaaht.agent.assistant.model import Finished, ModelRequest, ProviderError, TextDelta, ToolCallReady
from baaaht.agent.assistant.turns import CANCELLED, Assistant, Partials, ToolAnswer
from baaaht.bus.subscription import Delivery
from baaaht.bus.testing import run_async
from baaaht.schemas.sessions import (
    Message,
    MessageMetadata,
    MessagePage,
    MessageToolCall,
    SessionCancelled,
    SessionMessage,
    SessionMessages,
    SessionPartial,
    SessionSendMessage,
)

S = "s" * 32
READ = MessageToolCall(id="c1", name="read_file", arguments='{"path": "notes.txt"}')
GLOB = MessageToolCall(id="c2", name="glob", arguments='{"pattern": "*"}')


class SessionBus:
    """The session service and the broker as one assistant sees them: stored messages, their events
    (since 0: replayed), cancel events, and the partials it publishes."""

    def __init__(self, history: list[Message] = ()):
        self.messages: list[Message] = list(history)
        self.partials: list[SessionPartial] = []
        self.subscribers: list[tuple[str, asyncio.Queue]] = []
        self.stored = asyncio.Event()

    async def call(self, request, timeout=None):
        if isinstance(request, SessionMessages):
            page = [m for m in self.messages if m.seq > request.cursor][: request.limit]
            more = len([m for m in self.messages if m.seq > request.cursor]) > request.limit
            return MessagePage(messages=page, next_cursor=page[-1].seq if more else 0)
        assert isinstance(request, SessionSendMessage) and request.session_id == S
        return self.add(request.role, request.content, request.metadata)

    def add(self, role: str, content: str, metadata: MessageMetadata | None = None) -> Message:
        seq = len(self.messages) + 1
        message = Message(
            id=f"m{seq}",
            seq=seq,
            time=0.0,
            role=role,
            content=content,
            metadata=metadata or MessageMetadata(),
        )
        self.messages.append(message)
        self._deliver("session.message", SessionMessage(session_id=S, message=message))
        self.stored.set()
        return message

    def cancel(self) -> None:
        self._deliver("session.cancel", SessionCancelled(session_id=S, requested_by="operator"))

    def _deliver(self, tag: str, event) -> None:
        delivery = Delivery(0, 0.0, f"{tag}/{S}", "session", msgspec.msgpack.encode(event))
        for topic, queue in self.subscribers:
            if topic == tag:
                queue.put_nowait(delivery)

    async def publish(self, event) -> None:
        self.partials.append(event)

    async def subscribe(self, topics, since=None):
        (topic,) = topics
        queue: asyncio.Queue = asyncio.Queue()
        self.subscribers.append((topic, queue))
        if since == 0 and topic == "session.message":
            for message in list(self.messages):
                self._deliver_to(queue, SessionMessage(session_id=S, message=message))
        while True:
            yield await queue.get()

    def _deliver_to(self, queue, event) -> None:
        queue.put_nowait(Delivery(0, 0.0, f"session.message/{S}", "session", msgspec.msgpack.encode(event)))

    def stream(self, request, timeout=None):
        raise AssertionError("the fake tools run no task")

    def own(self) -> list[Message]:
        return [m for m in self.messages if m.metadata.reply_to]


class Model:
    """Scripted replies: each a list of events (a ProviderError among them is raised there), or an
    asyncio.Event to wait for before the rest."""

    provider, route = "anthropic", "anthropic"

    def __init__(self, *replies):
        self.replies = list(replies)
        self.requests: list[ModelRequest] = []

    async def stream(self, request):
        self.requests.append(request)
        for step in self.replies.pop(0):
            if isinstance(step, ProviderError):
                raise step
            if isinstance(step, asyncio.Event):
                await step.wait()
                continue
            yield step


def text(*pieces: str, stop: str = "end_turn") -> list:
    return [*(TextDelta(p) for p in pieces), Finished(stop)]


def calls(*tool_calls: MessageToolCall, say: str = "") -> list:
    return [*([TextDelta(say)] if say else []), *(ToolCallReady(c) for c in tool_calls), Finished("tool_use")]


class Tools:
    def __init__(self, bus: SessionBus, gate: asyncio.Event | None = None):
        self.bus, self.gate = bus, gate
        self.runs: list[tuple[str, str]] = []
        self.running: set[str] = set()
        self.most_at_once = 0
        self.stored_before_run: list[bool] = []
        self.cancelled: list[str] = []

    async def run(self, turn_id, call, output):
        self.runs.append((turn_id, call.id))
        self.stored_before_run.append(any(call in m.metadata.tool_calls for m in self.bus.messages))
        self.running.add(call.id)
        self.most_at_once = max(self.most_at_once, len(self.running))
        try:
            await asyncio.sleep(0)  # let a parallel call start
            if self.gate is not None:
                await self.gate.wait()
            return ToolAnswer(f'{{"content": "result of {call.id}"}}')
        finally:
            self.running.discard(call.id)

    async def cancel(self, turn_id, call):
        self.cancelled.append(call.id)


CONFIG = AssistantConfig(retry_delay=1.0, retries=2)


def assistant(bus, model, tools=None, config=CONFIG, sleeps=None):
    async def sleep(seconds):
        sleeps.append(seconds)

    return Assistant(
        bus, S, model, tools or Tools(bus), config, sleep=sleep if sleeps is not None else asyncio.sleep
    )


async def serve_until(helper: Assistant, bus: SessionBus, done) -> None:
    """Run the assistant until `done(bus)` holds after a store (bounded by run_async's timeout)."""
    serving = asyncio.create_task(helper.serve())
    try:
        while not done(bus):
            bus.stored.clear()
            waiting = asyncio.create_task(bus.stored.wait())
            await asyncio.wait([waiting, serving], return_when=asyncio.FIRST_COMPLETED)
            if serving.done():
                serving.result()
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)


def ended(count: int = 1):
    return lambda bus: sum(1 for m in bus.messages if m.metadata.turn_end) >= count


def test_a_user_message_is_answered_once_streamed_in_order_and_stored():
    bus = SessionBus()
    user = bus.add("user", "hello")  # in the history and replayed by the subscription: answered once
    model = Model(text("Hello ", "there."))
    run_async(serve_until(assistant(bus, model), bus, ended()), timeout=10)
    (answer,) = bus.own()
    assert (answer.role, answer.content) == ("assistant", "Hello there.")
    assert (answer.metadata.reply_to, answer.metadata.turn_end, answer.metadata.is_error) == (
        user.id,
        "done",
        False,
    )
    partials = [(p.seq, p.kind, p.text) for p in bus.partials]
    assert partials == [(1, "text", "Hello "), (2, "text", "there.")]
    assert {p.turn_id for p in bus.partials} == {answer.metadata.turn_id} and answer.metadata.turn_id
    (request,) = model.requests
    assert [m.content for m in request.messages] == ["hello"] and request.tools[0]["name"] == "read_file"


def test_tool_calls_are_stored_before_they_run_run_in_parallel_and_are_answered():
    bus = SessionBus()
    user = bus.add("user", "what is there?")
    model = Model(calls(READ, GLOB, say="Looking."), text("Done."))
    tools = Tools(bus)
    run_async(serve_until(assistant(bus, model, tools), bus, ended()), timeout=10)
    asked, *answers, final = bus.own()
    assert (asked.content, asked.metadata.tool_calls, asked.metadata.turn_end) == (
        "Looking.",
        [READ, GLOB],
        "",
    )
    assert tools.stored_before_run == [True, True] and tools.most_at_once == 2
    turn = asked.metadata.turn_id
    assert sorted(tools.runs) == [(turn, "c1"), (turn, "c2")]
    assert sorted((m.role, m.metadata.tool_call_id, m.metadata.tool_name) for m in answers) == [
        ("tool", "c1", "read_file"),
        ("tool", "c2", "glob"),
    ]
    assert (final.content, final.metadata.turn_end, final.metadata.turn_id) == ("Done.", "done", turn)
    assert {m.metadata.reply_to for m in bus.own()} == {user.id}
    second = model.requests[1].messages
    assert [m.role for m in second] == ["user", "assistant", "tool", "tool"]
    kinds = [p.kind for p in bus.partials]
    assert kinds[:3] == ["text", "tool_call", "tool_call"] and kinds.count("tool_result") == 2


def test_after_a_restart_a_turn_cut_short_is_taken_up_and_a_finished_one_never_answered_again():
    done_turn = [
        Message(id="m1", seq=1, time=0.0, role="user", content="earlier"),
        Message(
            id="m2",
            seq=2,
            time=0.0,
            role="assistant",
            content="ok",
            metadata=MessageMetadata(reply_to="m1", turn_id="t0", turn_end="done"),
        ),
        Message(id="m3", seq=3, time=0.0, role="user", content="read both"),
        Message(
            id="m4",
            seq=4,
            time=0.0,
            role="assistant",
            content="",
            metadata=MessageMetadata(reply_to="m3", turn_id="t1", tool_calls=[READ, GLOB]),
        ),
        Message(
            id="m5",
            seq=5,
            time=0.0,
            role="tool",
            content="r1",
            metadata=MessageMetadata(reply_to="m3", turn_id="t1", tool_call_id="c1"),
        ),
    ]
    bus = SessionBus(done_turn)
    model = Model(text("Both read."))
    tools = Tools(bus)
    run_async(serve_until(assistant(bus, model, tools), bus, ended(2)), timeout=10)
    assert tools.runs == [("t1", "c2")]  # the call already answered is not run again
    assert [(m.role, m.metadata.turn_id, m.metadata.turn_end) for m in bus.messages[5:]] == [
        ("tool", "t1", ""),
        ("assistant", "t1", "done"),
    ]
    assert len(model.requests) == 1  # the finished turn was not answered again


def test_a_session_cancel_mid_stream_keeps_what_was_said_and_ends_the_turn_cancelled():
    bus = SessionBus()
    bus.add("user", "tell me a long story")
    hold = asyncio.Event()  # never set: the model goes silent after its first words
    model = Model([TextDelta("Once upon"), hold, *text(" a time")], text("next answer"))

    async def scenario():
        helper = assistant(bus, model)
        serving = asyncio.create_task(serve_until(helper, bus, ended(2)))
        while not bus.partials:
            await asyncio.sleep(0.01)
        bus.cancel()
        while not ended()(bus):
            await asyncio.sleep(0.01)
        bus.add("user", "and now?")  # a message after the cancel is answered as usual
        await serving

    run_async(scenario(), timeout=10)
    cancelled, _, answered = bus.messages[1:]
    assert (cancelled.content, cancelled.metadata.turn_end, cancelled.metadata.is_error) == (
        "Once upon\n\n[cancelled]",
        "cancelled",
        True,
    )
    assert (answered.content, answered.metadata.turn_end) == ("next answer", "done")
    assert [p.text for p in bus.partials if p.kind == "status"] == ["cancelled"]


def test_a_stop_message_cancels_the_running_tools_and_answers_each_call_cancelled():
    bus = SessionBus()
    bus.add("user", "read")
    tools = Tools(bus, gate=asyncio.Event())  # the tools never finish
    model = Model(calls(READ, GLOB))

    async def scenario():
        serving = asyncio.create_task(serve_until(assistant(bus, model, tools), bus, ended()))
        while len(tools.running) < 2:
            await asyncio.sleep(0.01)
        bus.add("user", "/stop")
        await serving

    run_async(scenario(), timeout=10)
    assert sorted(tools.cancelled) == ["c1", "c2"]
    answers = [m for m in bus.own() if m.role == "tool"]
    assert sorted(m.metadata.tool_call_id for m in answers) == ["c1", "c2"]
    assert {(m.content, m.metadata.is_error) for m in answers} == {(CANCELLED, True)}
    assert (bus.messages[-1].content, bus.messages[-1].metadata.turn_end) == ("Cancelled.", "cancelled")
    assert not any(m.metadata.reply_to == "m3" for m in bus.messages)  # `/stop` itself is never answered


def test_a_message_followed_by_a_stop_before_it_was_answered_is_recorded_cancelled_not_answered():
    bus = SessionBus(
        [
            Message(id="m1", seq=1, time=0.0, role="user", content="do it"),
            Message(id="m2", seq=2, time=0.0, role="user", content="/stop"),
        ]
    )
    model = Model()
    run_async(serve_until(assistant(bus, model), bus, ended()), timeout=10)
    (record,) = bus.own()
    assert (record.metadata.reply_to, record.metadata.turn_end) == (
        "m1",
        "cancelled",
    ) and model.requests == []


def test_rate_limits_and_cut_streams_are_retried_with_backoff_then_answered():
    bus = SessionBus()
    bus.add("user", "hi")
    model = Model(
        [ProviderError("rate_limit", "slow down", 429)],
        [TextDelta("Hel"), ProviderError("cut", "stream cut")],
        text("Hello."),
    )
    sleeps: list[float] = []
    run_async(serve_until(assistant(bus, model, sleeps=sleeps), bus, ended()), timeout=10)
    assert sleeps == [1.0, 2.0]
    (answer,) = bus.own()
    assert (answer.content, answer.metadata.turn_end) == ("Hello.", "done")
    statuses = [p.text for p in bus.partials if p.kind == "status"]
    assert len(statuses) == 2 and "rate_limit" in statuses[0] and "cut" in statuses[1]


def test_retries_are_bounded_and_the_failure_is_told_in_the_session():
    bus = SessionBus()
    bus.add("user", "hi")
    error = ProviderError("server", "overloaded", 529)
    model = Model([error], [error], [error])
    sleeps: list[float] = []
    run_async(serve_until(assistant(bus, model, sleeps=sleeps), bus, ended()), timeout=10)
    assert sleeps == [1.0, 2.0] and len(model.requests) == 3
    (notice,) = bus.own()
    assert (notice.metadata.turn_end, notice.metadata.is_error) == ("failed", True)
    assert "after 2 retries" in notice.content and "HTTP 529" in notice.content


@pytest.mark.parametrize(
    ("refused", "says"),
    [
        ("role", ["route `anthropic` is not open to this assistant", "list `assistant`"]),
        (
            "route",
            ["no route `anthropic`", "egress.routes", "baaaht-ctl credentials add anthropic --kind api-key"],
        ),
        (
            "credential",
            [
                "credential of the egress route `anthropic`",
                "baaaht-ctl credentials add anthropic --kind api-key",
            ],
        ),
    ],
)
def test_no_route_or_credential_is_answered_with_what_to_configure_without_retrying(refused, says):
    bus = SessionBus()
    bus.add("user", "hi")
    model = Model([ProviderError("refused", "refused by the proxy", 404, refused)])
    sleeps: list[float] = []
    run_async(serve_until(assistant(bus, model, sleeps=sleeps), bus, ended()), timeout=10)
    (notice,) = bus.own()
    assert sleeps == [] and notice.metadata.turn_end == "failed"
    for text_part in says:
        assert text_part in notice.content


def test_tool_calls_over_the_cap_are_answered_without_running():
    bus = SessionBus()
    bus.add("user", "read")
    tools = Tools(bus)
    config = AssistantConfig(max_tool_calls=1)
    run_async(
        serve_until(assistant(bus, Model(calls(READ, GLOB), text("ok")), tools, config), bus, ended()),
        timeout=10,
    )
    assert [call for _, call in tools.runs] == ["c1"]
    (refused,) = [m for m in bus.own() if m.metadata.tool_call_id == "c2"]
    assert refused.metadata.is_error and "limit of 1 tool calls" in refused.content


def test_model_calls_over_the_cap_end_the_turn_with_limit():
    bus = SessionBus()
    bus.add("user", "loop")
    config = AssistantConfig(max_turns=2)
    model = Model(calls(READ), calls(MessageToolCall(id="c3", name="glob", arguments="{}")))
    run_async(serve_until(assistant(bus, model, config=config), bus, ended()), timeout=10)
    assert len(model.requests) == 2
    last = bus.messages[-1]
    assert (last.metadata.turn_end, last.metadata.is_error) == (
        "limit",
        True,
    ) and "2 model calls" in last.content


def test_a_session_cancel_also_cancels_the_messages_waiting_for_their_turn():
    bus = SessionBus()
    bus.add("user", "first")
    hold = asyncio.Event()
    model = Model([TextDelta("Work"), hold])

    async def scenario():
        serving = asyncio.create_task(serve_until(assistant(bus, model), bus, ended(2)))
        while not bus.partials:
            await asyncio.sleep(0.01)
        waiting = bus.add("user", "second, sent while the first was answered")
        await asyncio.sleep(0)  # the assistant has seen it
        bus.cancel()
        await serving
        return waiting

    waiting = run_async(scenario(), timeout=10)
    first, second = [m for m in bus.own()]
    assert (first.metadata.reply_to, first.metadata.turn_end) == ("m1", "cancelled")
    assert (second.metadata.reply_to, second.metadata.turn_end) == (waiting.id, "cancelled")
    assert second.content == "Cancelled before it was answered." and len(model.requests) == 1


def test_model_text_is_coalesced_the_first_piece_at_once_and_nothing_lost_or_reordered():
    bus = SessionBus()
    partials = Partials(bus, S, "t1", text_interval=0.05)

    async def scenario():
        await partials.text("a")  # at once: the first token is never held back
        assert [p.text for p in bus.partials] == ["a"]
        await partials.text("b")
        await partials.text("c")
        assert len(bus.partials) == 1  # held within the interval
        while len(bus.partials) < 2:
            await asyncio.sleep(0.01)  # sent once the interval is over, without another piece
        await partials.text("d")
        await partials.publish("tool_call", "read_file {}", "c1")  # held text goes first
        await partials.flush()  # nothing held: nothing sent

    run_async(scenario(), timeout=10)
    assert [(p.seq, p.kind, p.text) for p in bus.partials] == [
        (1, "text", "a"),
        (2, "text", "bc"),
        (3, "text", "d"),
        (4, "tool_call", "read_file {}"),
    ]
