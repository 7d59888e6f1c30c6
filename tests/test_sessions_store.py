"""The SQLite adapter: durability settings, file modes, atomic changes, paging, schema versions."""

import os
import sqlite3
import stat

import pytest

from baaaht.schemas.sessions import Message, SessionContainer, SessionInfo, SessionState
from baaaht.services.sessions.store import SCHEMA_VERSION, SessionStore, StoreError


def session(session_id: str, owner: str = "alice", state=SessionState.ACTIVE, **labels: str) -> SessionInfo:
    return SessionInfo(
        id=session_id,
        state=state,
        owner=owner,
        labels=labels,
        created_at=1.0,
        updated_at=1.0,
        last_activity_at=1.0,
    )


def message(seq: int) -> Message:
    return Message(id=f"m{seq}", seq=seq, time=float(seq), role="user", content=f"text {seq}")


@pytest.fixture
def store(tmp_path):
    opened = SessionStore.in_data_dir(str(tmp_path / "data"))
    yield opened
    opened.close()


def test_database_is_wal_with_full_sync_and_private_files(store, tmp_path):
    with store.write() as tx:
        tx.insert(session("s1"))
    directory = tmp_path / "data" / "sessions"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for name in os.listdir(directory):
        assert stat.S_IMODE((directory / name).stat().st_mode) == 0o600, name
    probe = sqlite3.connect(store.path)
    try:
        assert probe.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        probe.close()
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_a_change_that_raises_leaves_nothing_and_runs_no_commit_actions(store):
    ran = []
    with pytest.raises(RuntimeError):
        with store.write() as tx:
            tx.insert(session("s1"))
            tx.append_message("s1", message(1))
            tx.after_commit(lambda: ran.append("published"))
            raise RuntimeError("half-way")
    assert store.get("s1") is None
    assert store.messages("s1", newest_first=False, limit=10, cursor=0) == ([], 0)
    assert ran == []


def test_commit_actions_run_after_commit_and_a_failing_one_does_not_undo_the_change(store):
    seen = []

    def check_committed():
        seen.append(store._db.in_transaction)
        raise RuntimeError("publishing failed")

    with store.write() as tx:
        tx.insert(session("s1"))
        tx.after_commit(check_committed)
    assert seen == [False]
    assert store.get("s1").id == "s1"


def test_changes_survive_reopening(tmp_path):
    data_dir = str(tmp_path / "data")
    first = SessionStore.in_data_dir(data_dir)
    with first.write() as tx:
        tx.insert(session("s1", state=SessionState.IDLE))
        tx.append_message("s1", message(1))
    first.close()
    second = SessionStore.in_data_dir(data_dir)
    try:
        assert second.get("s1").state is SessionState.IDLE
        assert [m.content for m in second.messages("s1", False, 10, 0)[0]] == ["text 1"]
    finally:
        second.close()


def test_a_newer_schema_version_is_refused(tmp_path):
    path = tmp_path / "sessions.db"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(StoreError, match="schema version"):
        SessionStore(str(path))


def test_a_file_that_is_not_a_database_is_refused_not_replaced(tmp_path):
    path = tmp_path / "sessions.db"
    path.write_bytes(b"definitely not SQLite " * 100)
    with pytest.raises(sqlite3.DatabaseError):
        SessionStore(str(path))
    assert path.read_bytes() == b"definitely not SQLite " * 100


def test_list_pages_filters_and_matches_every_label(store):
    with store.write() as tx:
        tx.insert(session("a", owner="alice", team="x", env="prod"))
        tx.insert(session("b", owner="bob", team="x"))
        tx.insert(session("c", owner="alice", state=SessionState.CLOSED, team="y"))
        tx.insert(session("d", owner="alice", team="x", env="dev"))
    everyone = []
    cursor = 0
    while True:
        page, cursor = store.list([], "", {}, limit=1, cursor=cursor)
        everyone += [s.id for s in page]
        if not cursor:
            break
    assert everyone == ["a", "b", "c", "d"]
    assert [s.id for s in store.list([], "alice", {}, 10, 0)[0]] == ["a", "c", "d"]
    assert [s.id for s in store.list([SessionState.CLOSED], "", {}, 10, 0)[0]] == ["c"]
    assert [s.id for s in store.list([], "", {"team": "x"}, 10, 0)[0]] == ["a", "b", "d"]
    assert [s.id for s in store.list([], "", {"team": "x", "env": "prod"}, 10, 0)[0]] == ["a"]
    assert store.list([], "", {"team": "x' OR 1=1 --"}, 10, 0) == ([], 0)


def test_messages_page_in_either_order_without_gaps_or_repeats(store):
    with store.write() as tx:
        tx.insert(session("s1"))
        for seq in range(1, 8):
            tx.append_message("s1", message(seq))
    for newest_first, expected in ((False, list(range(1, 8))), (True, list(range(7, 0, -1)))):
        seen, cursor = [], 0
        while True:
            page, cursor = store.messages("s1", newest_first, limit=3, cursor=cursor)
            seen += [m.seq for m in page]
            if not cursor:
                break
        assert seen == expected


def test_holding_container_and_count_not_closed(store):
    first = session("a")
    first.containers = [SessionContainer(id="c1", attached_at=1.0)]
    with store.write() as tx:
        tx.insert(first)
        tx.insert(session("b", state=SessionState.CLOSED))
        tx.insert(session("c", state=SessionState.CLOSING))
        assert [s.id for s in tx.holding_container("c1")] == ["a"]
        assert tx.holding_container("c2") == []
        assert tx.count_not_closed() == 2
