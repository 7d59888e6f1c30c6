"""`baaaht-ctl sessions ...` and `baaaht-ctl send` against the real session service."""

from __future__ import annotations

import subprocess
import sys
import threading

import orjson
import pytest
import typer
from typer.testing import CliRunner

from baaaht.ctl import sessions
from baaaht.ctl.common import state
from baaaht.schemas.sessions import SessionClose, SessionCreate, SessionGet, SessionSendMessage, SessionState
from tests.harness import wait_for
from tests.session_doubles import start_sessions_host

cli = typer.Typer()
cli.add_typer(sessions.app, name="sessions")
cli.command("send")(sessions.send)


@pytest.fixture
def host(make_host):
    started = start_sessions_host(make_host)
    state.config_path = str(started.config_path)
    yield started
    state.close()
    state.config_path = None
    state._config = None
    state.json = False


def run(*args: str, json: bool = False, expect: int = 0, stdin: str | None = None):
    state.json = json
    result = CliRunner().invoke(cli, list(args), input=stdin)
    assert result.exit_code == expect, result.output
    return result


def fields(text: str) -> dict[str, str]:
    """`key  value` lines, as printed for one record."""
    return dict(line.split(None, 1) for line in text.splitlines())


def test_create_send_messages_and_list(host):
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


def test_get_close_and_errors(host):
    session_id = host.client().call(SessionCreate(owner="alice")).id
    shown = fields(run("sessions", "get", session_id).stdout)
    assert (shown["id"], shown["state"], shown["owner"]) == (session_id, "active", "alice")
    closed = orjson.loads(run("sessions", "close", session_id, "--reason", "done", json=True).stdout)
    assert (closed["state"], closed["close_reason"]) == ("closed", "done")
    result = run("send", session_id, "late", expect=1)
    assert "error FAILED_PRECONDITION" in result.stderr and "from closed to active" in result.stderr
    result = run("sessions", "get", "nope", expect=1)
    assert "error NOT_FOUND: no session nope" in result.stderr
    result = run("sessions", "create", "--max-duration", "soon", expect=1)
    assert "--max-duration 'soon' is not a duration" in result.stderr
    result = run("sessions", "create", "--label", "novalue", expect=1)
    assert "expected KEY=VALUE" in result.stderr


def test_export_writes_every_message_as_json_lines(host, tmp_path):
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


def test_watch_shows_history_then_live_messages_once_each_until_closed(host, capsys):
    client = host.client()
    session_id = client.call(SessionCreate(owner="alice")).id
    client.call(SessionSendMessage(session_id=session_id, content="earlier"))
    watcher = threading.Thread(target=sessions.watch, args=(session_id, 10))
    watcher.start()
    out, err = [], []

    def history_shown() -> bool:
        captured = capsys.readouterr()
        out.append(captured.out)
        err.append(captured.err)
        return "earlier" in "".join(out)

    # The session must still be open when watch looks it up; live messages may come at any time after.
    wait_for(history_shown, what="watch to show the history")
    for n in range(3):
        client.call(SessionSendMessage(session_id=session_id, content=f"live {n}"))
    client.call(SessionClose(session_id=session_id))
    watcher.join(15)
    assert not watcher.is_alive()
    captured = capsys.readouterr()
    shown = [line.split("] ", 1)[1] for line in ("".join(out) + captured.out).splitlines()]
    assert shown == ["#1 user: earlier", "#2 user: live 0", "#3 user: live 1", "#4 user: live 2"]
    assert "session closed: closed on request" in "".join(err) + captured.err
    assert client.call(SessionGet(session_id=session_id)).state is SessionState.CLOSED


def test_baaaht_ctl_main_has_the_sessions_commands(host):
    # What the baaaht-ctl script runs (pyproject: baaaht.ctl.main:main), as its own process.
    entry_point = "from baaaht.ctl.main import main; main()"
    ctl = [sys.executable, "-c", entry_point, "--config", str(host.config_path)]

    def run_ctl(*args: str) -> str:
        done = subprocess.run([*ctl, *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    session_id = orjson.loads(run_ctl("sessions", "create", "--owner", "bob", "--json"))["id"]
    run_ctl("send", session_id, "via the real entry point")
    listed = orjson.loads(run_ctl("sessions", "messages", session_id, "--json"))
    assert [(m["seq"], m["role"], m["content"]) for m in listed] == [(1, "user", "via the real entry point")]
