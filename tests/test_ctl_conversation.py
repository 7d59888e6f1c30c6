"""How baaaht-ctl shows a conversation as it streams (ctl/conversation.py): pure rendering."""

from __future__ import annotations

import io

from baaaht.ctl.conversation import Conversation, one_line
from baaaht.schemas.sessions import Message, MessageMetadata, SessionClosed, SessionMessage, SessionPartial

S = "s1"
T0 = 1_700_000_000.0


def message(seq: int, role: str, content: str, **metadata) -> Message:
    return Message(
        id=f"m{seq}", seq=seq, time=T0 + seq, role=role, content=content, metadata=MessageMetadata(**metadata)
    )


def partial(seq: int, text: str, kind: str = "text", turn: str = "t1") -> SessionPartial:
    return SessionPartial(session_id=S, turn_id=turn, seq=seq, kind=kind, text=text)


def shown(*events) -> str:
    out = io.StringIO()
    view = Conversation(out)
    for event in events:
        view.take(event, S)
    return out.getvalue()


def test_a_streamed_answer_is_shown_as_it_comes_and_not_again_when_stored():
    user = message(1, "user", "what is in notes.txt?")
    text = shown(
        SessionMessage(session_id=S, message=user),
        partial(1, "Let me "),
        partial(2, "look."),
        partial(3, 'read_file {"path": "notes.txt"}', "tool_call"),
        SessionMessage(
            session_id=S, message=message(2, "assistant", "Let me look.", turn_id="t1", reply_to="m1")
        ),
        partial(4, "first line\nsecond line", "tool_result"),
        partial(5, "It says "),
        partial(6, "first line."),
        SessionMessage(
            session_id=S,
            message=message(
                3, "assistant", "It says first line.", turn_id="t1", reply_to="m1", turn_end="done"
            ),
        ),
    )
    assert text == (
        "[2023-11-14T22:13:21Z] #1 user: what is in notes.txt?\n"
        "assistant: Let me look.\n"
        '  → read_file {"path": "notes.txt"}\n'
        "  ← first line second line\n"
        "assistant: It says first line.\n"
    )


def test_a_turn_that_did_not_end_done_says_how_it_ended():
    text = shown(
        partial(1, "Once upon"),
        SessionMessage(
            session_id=S,
            message=message(2, "assistant", "Once upon", turn_id="t1", reply_to="m1", turn_end="cancelled"),
        ),
    )
    assert text == "assistant: Once upon\n  · turn cancelled\n"


def test_a_message_of_a_turn_not_streamed_is_shown_whole():
    stored = message(2, "assistant", "no route for anthropic", turn_id="t9", reply_to="m1", turn_end="failed")
    assert shown(SessionMessage(session_id=S, message=stored)) == (
        "[2023-11-14T22:13:22Z] #2 assistant: no route for anthropic\n"
    )


def test_the_waiter_gets_the_answer_once_its_turn_ended_and_user_messages_are_not_echoed():
    view = Conversation(io.StringIO(), echo_user=False)
    user = message(1, "user", "hi")
    ended = view.expect(user.id)
    view.message(user)
    first = message(2, "assistant", "calling a tool", turn_id="t1", reply_to="m1")
    view.message(first)
    assert not ended.is_set()
    last = message(3, "assistant", "done now", turn_id="t1", reply_to="m1", turn_end="done")
    view.message(last)
    assert ended.is_set()
    assert view.answer(user.id) == [first, last]
    assert "hi" not in view.out.getvalue()


def test_the_sessions_close_ends_every_wait_and_other_sessions_closes_do_not():
    view = Conversation(io.StringIO())
    ended = view.expect("m1")
    assert view.take(SessionClosed(session_id="other", owner="a", reason="x"), S) is True
    assert not ended.is_set()
    assert view.take(SessionClosed(session_id=S, owner="a", reason="x"), S) is False
    assert ended.is_set()


def test_tool_lines_are_one_line_and_shortened():
    assert one_line("a\n  b\tc") == "a b c"
    assert one_line("x" * 200, 10) == "x" * 9 + "…"


def test_terminal_control_sequences_from_an_agent_are_shown_not_obeyed():
    """An assistant's text (model output a prompt injection may steer) and its stored messages reach the
    operator's terminal: escape sequences (OSC 52 clipboard writes, cursor moves, screen clears) and
    carriage returns are shown as visible escapes, never sent raw."""
    attack = "ok\x1b]52;c;ZWNobyBwd25lZA==\x07\x1b[2J\rfake\x9b1A"
    text = shown(
        SessionMessage(session_id=S, message=message(1, "user", "hi")),
        partial(1, attack),
        partial(2, attack, "tool_result"),
        SessionMessage(session_id=S, message=message(2, "assistant", attack, turn_id="t2", reply_to="m1")),
    )
    assert not any(ch in text for ch in "\x1b\x07\r\x9b"), repr(text)
    assert "ok\\x1b]52;c;" in text and "\\x0d" in text
    assert "\n" in text  # the view's own line ends stay


def test_table_cells_show_control_characters_as_escapes():
    from baaaht.ctl.common import table

    rendered = table([{"name": "evil\x1b[31mred\rx", "kind": "file"}])
    assert "\x1b" not in rendered and "\r" not in rendered
    assert "evil\\x1b[31mred\\x0dx" in rendered
