"""The assistant's context (pure): turns of a conversation, what is unanswered, the budget."""

from __future__ import annotations

from baaaht.agent.assistant.context import (
    NO_RESULT,
    cost,
    dropped_note,
    every_call_answered,
    fit,
    shown_messages,
    turns_of,
    unanswered,
)
from baaaht.schemas.sessions import Message, MessageMetadata, MessageToolCall


def msg(seq: int, role: str, content: str = "x", **metadata) -> Message:
    return Message(
        id=f"m{seq}", seq=seq, time=0.0, role=role, content=content, metadata=MessageMetadata(**metadata)
    )


def test_a_turn_is_a_user_message_and_what_answers_it_even_when_answers_interleave():
    messages = [
        msg(1, "system", "note before anything"),
        msg(2, "user", "first"),
        msg(3, "user", "second"),  # sent while the first was being answered
        msg(4, "assistant", "answer 1", reply_to="m2", turn_end="done"),
        msg(5, "assistant", "answer 2", reply_to="m3", turn_end="done"),
        msg(6, "system", "host note"),  # answers nothing: belongs to the turn it follows
    ]
    turns = turns_of(list(reversed(messages)))
    assert [(t.user.id if t.user else None, [m.id for m in t.messages]) for t in turns] == [
        (None, ["m1"]),
        ("m2", ["m4"]),
        ("m3", ["m5", "m6"]),
    ]
    assert [m.id for m in turns[2].own] == ["m5"]


def test_unanswered_are_user_messages_whose_turn_has_not_ended_and_never_a_stop():
    messages = [
        msg(1, "user", "done one"),
        msg(2, "assistant", "a", reply_to="m1", turn_end="done"),
        msg(3, "user", "half done"),
        msg(4, "assistant", "", reply_to="m3", tool_calls=[MessageToolCall(id="c1", name="read_file")]),
        msg(5, "user", " /stop "),
        msg(6, "user", "new"),
        msg(7, "user", "failed one"),
        msg(8, "assistant", "no route", reply_to="m7", turn_end="failed", is_error=True),
    ]
    assert [m.id for m in unanswered(messages)] == ["m3", "m6"]


def test_the_budget_drops_the_oldest_whole_turns_and_says_so():
    long = "y" * 400  # 100 tokens + framing
    messages = [
        msg(1, "user", long),
        msg(2, "assistant", long, reply_to="m1", turn_end="done"),
        msg(3, "user", long),
        msg(4, "assistant", long, reply_to="m3", turn_end="done"),
        msg(5, "user", "now"),
    ]
    turns = turns_of(messages)
    per_turn = 2 * cost(messages[0])
    context = fit(turns, budget=per_turn + cost(messages[4]))
    assert [t.user.id for t in context.turns] == ["m3", "m5"]
    assert (context.dropped_turns, context.dropped_messages) == (1, 2)
    assert "1 oldest turns" in dropped_note(context) and "2 messages" in dropped_note(context)
    assert [m.id for m in shown_messages(context)] == ["m3", "m4", "m5"]
    everything = fit(turns, budget=10**6)
    assert everything.dropped_turns == 0 and dropped_note(everything) == ""


def test_the_turn_being_answered_is_kept_whole_even_over_the_budget():
    messages = [msg(1, "user", "old"), msg(2, "user", "z" * 10_000)]
    context = fit(turns_of(messages), budget=10)
    assert [t.user.id for t in context.turns] == ["m2"]
    assert shown_messages(context)[0].content == "z" * 10_000  # never cut mid-message


def test_the_assistants_own_notices_are_not_shown_to_the_model():
    messages = [
        msg(1, "user", "hi"),
        msg(2, "assistant", "no credential: add it", reply_to="m1", turn_end="failed", is_error=True),
        msg(3, "user", "again"),
    ]
    assert [m.id for m in shown_messages(fit(turns_of(messages), 10**6))] == ["m1", "m3"]


def test_a_tool_call_left_unanswered_gets_an_error_answer_after_the_answers_it_has():
    calls = [MessageToolCall(id="c1", name="read_file"), MessageToolCall(id="c2", name="glob")]
    messages = [
        msg(1, "user"),
        msg(2, "assistant", "", reply_to="m1", turn_id="t", tool_calls=calls),
        msg(3, "tool", "result 1", reply_to="m1", tool_call_id="c1"),
        msg(4, "assistant", "cancelled", reply_to="m1", turn_end="cancelled"),
    ]
    found = every_call_answered(messages)
    assert [(m.role, m.metadata.tool_call_id, m.content) for m in found] == [
        ("user", "", "x"),
        ("assistant", "", ""),
        ("tool", "c1", "result 1"),
        ("tool", "c2", NO_RESULT),
        ("assistant", "", "cancelled"),
    ]
    assert found[3].metadata.is_error and found[3].metadata.tool_name == "glob"
    assert every_call_answered(messages[:3])[-1].metadata.tool_call_id == "c2"  # at the end too
