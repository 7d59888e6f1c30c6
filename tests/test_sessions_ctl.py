"""`baaaht-ctl sessions ...` and `baaaht-ctl send` against the real session service."""

from __future__ import annotations

import functools

import orjson
import pytest

from baaaht.bus.testing import next_event
from baaaht.schemas.base import session_topic
from baaaht.schemas.sessions import (
    SessionCancelled,
    SessionClose,
    SessionCreate,
    SessionGet,
    SessionSendMessage,
    SessionState,
)
from tests import ctl_runner
from tests.session_doubles import start_sessions_host


@pytest.fixture
def host(make_host):
    return start_sessions_host(make_host)


@pytest.fixture
def run(host):
    return functools.partial(ctl_runner.invoke, host)


def fields(text: str) -> dict[str, str]:
    """`key  value` lines, as printed for one record."""
    return dict(line.split(None, 1) for line in text.splitlines())


def test_create_send_messages_and_list(host, run):
    created = orjson.loads(
        run("sessions", "create", "--owner", "alice", "--name", "demo", "-l", "team=x", json=True).stdout
    )
    session_id = created["id"]
    assert (created["state"], created["labels"]) == ("active", {"team": "x"})
    assert fields(run("send", session_id, "hello there").stdout)["seq"] == "1"
    run("send", session_id, "-", stdin="from stdin\nsecond line")
    table = run("sessions", "messages", session_id).stdout
    assert table.splitlines()[0].split() == ["SEQ", "TIME", "ROLE", "SENDER", "CONTENT"]
    assert "hello there" in table and "from stdin second line" in table
    listed = orjson.loads(run("sessions", "list", "--label", "team=x", json=True).stdout)
    assert [(s["id"], s["message_count"]) for s in listed] == [(session_id, 2)]
    assert session_id in run("sessions", "list", "--state", "active").stdout
    assert run("sessions", "list", "--state", "closed").stdout.strip() == "(none)"


def test_get_close_and_errors(host, run):
    session_id = host.client().call(SessionCreate(owner="alice")).id
    shown = fields(run("sessions", "get", session_id).stdout)
    assert (shown["id"], shown["state"], shown["owner"]) == (session_id, "active", "alice")
    closed = orjson.loads(run("sessions", "close", session_id, "--reason", "done", json=True).stdout)
    assert (closed["state"], closed["close_reason"]) == ("closed", "done")
    result = run("send", session_id, "late", expect=1)
    assert f"error FAILED_PRECONDITION: session {session_id} is closed" in result.stderr
    result = run("sessions", "get", "nope", expect=1)
    assert "error NOT_FOUND: no session nope" in result.stderr
    result = run("sessions", "create", "--max-duration", "soon", expect=1)
    assert "--max-duration 'soon' is not a duration" in result.stderr
    result = run("sessions", "create", "--label", "novalue", expect=1)
    assert "expected KEY=VALUE" in result.stderr


def test_export_writes_every_message_as_json_lines(host, run, tmp_path):
    client = host.client()
    session_id = client.call(SessionCreate(owner="alice")).id
    for n in range(3):
        client.call(SessionSendMessage(session_id=session_id, content=f"line {n}\nwith a newline"))
    lines = run("sessions", "export", session_id).stdout.splitlines()
    assert [orjson.loads(line)["content"] for line in lines] == [
        f"line {n}\nwith a newline" for n in range(3)
    ]
    target = tmp_path / "conversation.jsonl"
    run("sessions", "export", session_id, "-o", str(target))
    assert target.read_text().splitlines() == lines
    assert "cannot write" in run("sessions", "export", session_id, "-o", str(target), expect=1).stderr
    assert not (tmp_path / "none.jsonl").exists()
    run("sessions", "export", "nope", "-o", str(tmp_path / "none.jsonl"), expect=1)
    assert not (tmp_path / "none.jsonl").exists()


def test_watch_shows_history_then_live_messages_once_each_until_closed(host):
    client = host.client()
    session_id = client.call(SessionCreate(owner="alice")).id
    client.call(SessionSendMessage(session_id=session_id, content="earlier"))
    watcher = ctl_runner.popen(host, "sessions", "watch", session_id)
    next_line = ctl_runner.line_reader(watcher, "a line from watch")
    try:
        # The session must still be open when watch looks it up; live messages may come at any time after.
        shown = [next_line()]
        for n in range(3):
            client.call(SessionSendMessage(session_id=session_id, content=f"live {n}"))
        client.call(SessionClose(session_id=session_id))
        shown += [next_line() for _ in range(3)]
        err = ctl_runner.stderr_once_ended(watcher)
    finally:
        ctl_runner.reap(watcher)
    assert [line.rstrip("\n").split("] ", 1)[1] for line in shown] == [
        "#1 user: earlier",
        "#2 user: live 0",
        "#3 user: live 1",
        "#4 user: live 2",
    ]
    assert shown[0].startswith("[20") and shown[0].split("]")[0].endswith("Z")  # the one time format
    assert watcher.returncode == 0 and "session closed: closed on request" in err
    assert client.call(SessionGet(session_id=session_id)).state is SessionState.CLOSED


def test_baaaht_ctl_script_sends_text_that_looks_like_a_flag_and_deletes(host):
    def run_ctl(*args: str, expect: int = 0):
        done = ctl_runner.run(host, *args)
        assert done.returncode == expect, done.stderr
        return done

    session_id = orjson.loads(run_ctl("sessions", "create", "--owner", "bob", "--json").stdout)["id"]
    assert run_ctl("send", session_id, "--", "--json").stdout.startswith("id ")  # text, not the flag
    sent = orjson.loads(run_ctl("send", session_id, "--json", "--", "-n 3").stdout)
    assert sent["content"] == "-n 3" and sent["time"].endswith("Z")
    listed = orjson.loads(run_ctl("sessions", "messages", session_id, "--json").stdout)
    assert [(m["seq"], m["content"]) for m in listed] == [(1, "--json"), (2, "-n 3")]
    refused = run_ctl("sessions", "delete", session_id, expect=1)
    assert "close it first" in refused.stderr
    run_ctl("sessions", "close", session_id)
    deleted = orjson.loads(run_ctl("--json", "sessions", "delete", session_id).stdout)
    assert deleted == {"id": session_id, "deleted": True}
    assert "NOT_FOUND" in run_ctl("sessions", "get", session_id, expect=1).stderr


def test_cancel_publishes_the_sessions_cancel_event(host, run):
    client = host.client()
    session_id = client.call(SessionCreate(owner="alice")).id
    with client.subscribe([session_topic(SessionCancelled, session_id)]) as events:
        result = run("sessions", "cancel", session_id, "--reason", "too long")
        assert f"cancel requested for {session_id}" in result.stderr
        event = next_event(events, lambda d: True, 10.0, "the session.cancel event").event
    assert (event.session_id, event.reason) == (session_id, "too long")
    assert event.requested_by.startswith("operator/")
    assert "error NOT_FOUND: no session nope" in run("sessions", "cancel", "nope", expect=1).stderr
