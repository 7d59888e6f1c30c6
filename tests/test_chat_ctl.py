"""`baaaht-ctl send --wait`, `sessions watch` and `chat` following an assistant's streamed turns (a
scripted assistant on the real bus and session service: tests/assistant_doubles.py)."""

from __future__ import annotations

import functools
import signal
import subprocess
import threading

import orjson
import pytest

from baaaht.bus.testing import Recorded, next_event
from baaaht.schemas.base import session_topic
from baaaht.schemas.sessions import (
    SessionCancelled,
    SessionClose,
    SessionCreate,
    SessionPartial,
    SessionSendMessage,
)
from tests import ctl_runner
from tests.assistant_doubles import ScriptedAssistant, Step
from tests.session_doubles import start_sessions_host

TOOL_TURN = [
    Step("text", "Let me "),
    Step("text", "look."),
    Step("tool_call", 'read_file {"path": "notes.txt"}'),
    Step("store", ""),
    Step("tool_result", "first line"),
    Step("text", "It starts with: first line"),
]


@pytest.fixture
def host(make_host):
    return start_sessions_host(make_host)


@pytest.fixture
def session_id(host):
    return host.client().call(SessionCreate(owner="alice")).id


@pytest.fixture
def assistant(host, session_id):
    made = ScriptedAssistant(host, session_id, script=list(TOOL_TURN))
    yield made
    made.stop()


@pytest.fixture
def run(host):
    return functools.partial(ctl_runner.invoke, host)


def test_send_wait_prints_the_answer_of_the_turn(run, session_id, assistant):
    result = run("send", session_id, "what is in notes.txt?", "--wait", "--wait-timeout", "30s")
    assert result.stdout == "Let me look.\nIt starts with: first line\n"
    answer = orjson.loads(run("send", session_id, "again", "--wait", json=True).stdout)
    assert [m["metadata"].get("turn_end", "") for m in answer] == ["", "done"]


def test_send_wait_fails_when_the_turn_is_cancelled(host, run, session_id, assistant):
    assistant.hold = True
    client = host.client()
    with client.subscribe([session_topic(SessionPartial, session_id)]) as partials:
        waiting = ctl_runner.popen(host, "send", session_id, "tell me a long story", "--wait")
        try:
            next_event(partials, lambda d: True, 30.0, "the turn to stream")
            run("sessions", "cancel", session_id)
            err = ctl_runner.stderr_once_ended(waiting, 30)
        finally:
            ctl_runner.reap(waiting)
    assert waiting.returncode == 1
    assert "the turn ended cancelled" in err


def test_send_wait_gives_up_after_its_timeout(run, session_id):
    result = run("send", session_id, "anyone?", "--wait", "--wait-timeout", "1s", expect=1)
    assert "no answer within 1s (--wait-timeout)" in result.stderr


def test_watch_shows_the_turn_as_it_streams(host, session_id, assistant):
    client = host.client()
    client.call(SessionSendMessage(session_id=session_id, role="system", content="welcome"))
    watcher = ctl_runner.popen(host, "sessions", "watch", session_id, "--history", "1")
    next_line = ctl_runner.line_reader(watcher, "a line from watch")
    try:
        assert next_line().endswith("#1 system: welcome\n")  # watch follows from before its history
        sent = ctl_runner.run(host, "send", session_id, "what is in notes.txt?", "--wait")
        assert sent.returncode == 0, sent.stderr
        shown = [next_line() for _ in range(5)]
        client.call(SessionClose(session_id=session_id))
        ctl_runner.stderr_once_ended(watcher, 30)
    finally:
        ctl_runner.reap(watcher)
    assert shown[0].endswith("#2 user: what is in notes.txt?\n")
    assert shown[1:] == [
        "assistant: Let me look.\n",
        '  → read_file {"path": "notes.txt"}\n',
        "  ← first line\n",
        "assistant: It starts with: first line\n",
    ]


def test_watch_json_prints_every_event_of_the_turn_as_a_line(host, session_id, assistant):
    client = host.client()
    client.call(SessionSendMessage(session_id=session_id, role="system", content="welcome"))
    watcher = ctl_runner.popen(host, "sessions", "watch", session_id, "--history", "1", "--json")
    next_line = ctl_runner.line_reader(watcher, "a line from watch --json")
    try:
        assert orjson.loads(next_line())["content"] == "welcome"
        sent = ctl_runner.run(host, "send", session_id, "what is in notes.txt?", "--wait")
        assert sent.returncode == 0, sent.stderr
        client.call(SessionClose(session_id=session_id))
        ctl_runner.stderr_once_ended(watcher, 30)
        lines = []
        while (line := next_line()) and orjson.loads(line)["type"] != "session.closed":
            lines.append(orjson.loads(line))
    finally:
        ctl_runner.reap(watcher)
    partials = [event for event in lines if event["type"] == "session.partial"]
    assert [(p["seq"], p["kind"]) for p in partials] == [
        (1, "text"),
        (2, "text"),
        (3, "tool_call"),
        (4, "tool_result"),
        (5, "text"),
    ]
    stored = [event["message"] for event in lines if event["type"] == "session.message"]
    assert [m["role"] for m in stored] == ["user", "assistant", "assistant"]


class Chat:
    """`baaaht-ctl chat` in its own process, its output read as it comes."""

    def __init__(self, host, *args: str):
        self.process = subprocess.Popen(
            [ctl_runner.CTL, *ctl_runner.host_args(host), "chat", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        self.out: Recorded[str] = Recorded()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while text := self.process.stdout.read(1):
            self.out.append(text)

    def type(self, line: str) -> None:
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def wait_for(self, predicate, what: str) -> str:
        """The output so far once `predicate` holds for it."""

        def holds(chars: list[str]) -> str | None:
            text = "".join(chars)
            return text if predicate(text) else None

        return self.out.wait_until(holds, timeout=30, what=what)

    def interrupt(self) -> None:
        self.process.send_signal(signal.SIGINT)

    def end(self, timeout: float = 30) -> tuple[int, str, str]:
        """(exit status, stdout, stderr) once it has ended; killed if it has not within `timeout`."""
        try:
            self.process.stdin.close()
            self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(5)
            self._reader.join(5)
            err = self.process.stderr.read()
            self.process.stdout.close()
            self.process.stderr.close()
        return self.process.returncode, "".join(self.out.snapshot()), err


def test_chat_streams_answers_and_leaves_at_end_of_input(host, session_id, assistant):
    chat = Chat(host, session_id)
    try:
        chat.type("what is in notes.txt?")
        chat.wait_for(lambda out: out.count("you> ") == 2, "the answer and the next prompt")
    finally:
        status, out, err = chat.end()
    assert status == 0, err
    assert out == (
        "you> assistant: Let me look.\n"
        '  → read_file {"path": "notes.txt"}\n'
        "  ← first line\n"
        "assistant: It starts with: first line\n"
        "you> "
    )


def test_chat_ctrl_c_cancels_the_turn_and_a_second_one_leaves(host, session_id, assistant):
    assistant.hold = True
    client = host.client()
    chat = Chat(host, session_id)
    try:
        with client.subscribe([session_topic(SessionCancelled, session_id)]) as cancels:
            chat.type("tell me a long story")
            chat.wait_for(lambda out: "It starts with: first line" in out, "the turn to stream")
            chat.interrupt()
            cancel = next_event(cancels, lambda d: True, 10.0, "the cancel from chat").event
            assert cancel.reason == "Ctrl-C in baaaht-ctl chat"
            chat.wait_for(lambda out: out.count("you> ") == 2, "the prompt after the cancelled turn")
            # The next turn goes on whatever it is told: a second Ctrl-C while its cancel is waited for.
            assistant.ignore_cancel = True
            chat.type("and another")
            chat.wait_for(lambda out: out.count("It starts with: first line") == 2, "the next turn")
            chat.interrupt()
            next_event(cancels, lambda d: True, 10.0, "the second cancel from chat")
        chat.interrupt()
    finally:
        status, out, err = chat.end()
    assert status == 0, err
    assert "turn cancelled" in out
    assert err.count("(cancelling: Ctrl-C again leaves)") == 2
