"""The SQLite adapter: durability, file modes, atomic changes, group commit, paging, schema versions."""

import os
import sqlite3
import stat
import threading
import time
from typing import Callable

import pytest

from baaaht.bus.testing import wait_for
from baaaht.schemas.sessions import Message, SessionContainer, SessionInfo, SessionState
from baaaht.services.sessions.store import SCHEMA_VERSION, SessionStore, StoreError, Transaction


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
    store.write(lambda tx: tx.insert(session("s1")))
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

    def half_way(tx: Transaction) -> None:
        tx.insert(session("s1"))
        tx.append_message("s1", message(1))
        tx.after_commit(lambda: ran.append("published"))
        raise RuntimeError("half-way")

    with pytest.raises(RuntimeError):
        store.write(half_way)
    assert store.get("s1") is None
    assert store.messages("s1", newest_first=False, limit=10, cursor=0) == ([], 0)
    assert ran == []


def test_commit_actions_run_after_commit_and_a_failing_one_does_not_undo_the_change(store):
    seen = []

    def check_committed():
        seen.append(store._db.in_transaction)
        raise RuntimeError("publishing failed")

    def insert(tx: Transaction) -> None:
        tx.insert(session("s1"))
        tx.after_commit(check_committed)

    store.write(insert)
    assert seen == [False]
    assert store.get("s1").id == "s1"


def test_changes_survive_reopening(tmp_path):
    data_dir = str(tmp_path / "data")
    first = SessionStore.in_data_dir(data_dir)

    def insert(tx: Transaction) -> None:
        tx.insert(session("s1", state=SessionState.IDLE))
        tx.append_message("s1", message(1))

    first.write(insert)
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
    def insert(tx: Transaction) -> None:
        tx.insert(session("a", owner="alice", team="x", env="prod"))
        tx.insert(session("b", owner="bob", team="x"))
        tx.insert(session("c", owner="alice", state=SessionState.CLOSED, team="y"))
        tx.insert(session("d", owner="alice", team="x", env="dev"))

    store.write(insert)
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
    def insert(tx: Transaction) -> None:
        tx.insert(session("s1"))
        for seq in range(1, 8):
            tx.append_message("s1", message(seq))

    store.write(insert)
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

    def insert(tx: Transaction) -> None:
        tx.insert(first)
        tx.insert(session("b", state=SessionState.CLOSED))
        tx.insert(session("c", state=SessionState.CLOSING))
        assert [s.id for s in tx.holding_container("c1")] == ["a"]
        assert tx.holding_container("c2") == []
        assert tx.count_not_closed() == 2

    store.write(insert)


def committed_ids(path: str) -> list[str]:
    """Session ids another connection sees: only what is committed."""
    probe = sqlite3.connect(path)
    try:
        return [row[0] for row in probe.execute("SELECT id FROM sessions ORDER BY seq")]
    finally:
        probe.close()


def group_of_writers(store, changes: dict[str, Callable[[Transaction], None]]):
    """Run the first change and hold it until every other writer waits for its turn, so all of them
    end up in one group; per writer, what raised (or None). Returns when every writer has returned."""
    names = list(changes)
    outcome: dict[str, BaseException | None] = {}
    first_inside = threading.Event()

    def apply(name: str, tx: Transaction) -> None:
        if name == names[0]:
            first_inside.set()
            wait_for(lambda: store.writers_waiting == len(names) - 1, what="the others to queue")
        changes[name](tx)

    def writer(name: str) -> None:
        try:
            store.write(lambda tx: apply(name, tx))
            outcome[name] = None
        except Exception as error:
            outcome[name] = error

    first = threading.Thread(target=writer, args=(names[0],))
    first.start()
    assert first_inside.wait(10)
    others = [threading.Thread(target=writer, args=(name,)) for name in names[1:]]
    for thread in others:
        thread.start()
    for thread in [first, *others]:
        thread.join(30)
    return outcome


def test_waiting_writers_share_one_commit_and_are_acknowledged_after_it(store):
    seen_at_commit: dict[str, list[str]] = {}
    order: list[str] = []

    def change(name: str):
        def apply(tx: Transaction) -> None:
            tx.insert(session(name))
            tx.after_commit(
                lambda: (order.append(name), seen_at_commit.setdefault(name, committed_ids(store.path)))
            )

        return apply

    outcome = group_of_writers(store, {name: change(name) for name in ("a", "b", "c", "d")})
    assert outcome == {"a": None, "b": None, "c": None, "d": None}
    # One commit for all: when the first change is durable, so are the three that waited.
    assert sorted(seen_at_commit["a"]) == ["a", "b", "c", "d"]
    assert order[0] == "a" and sorted(order) == ["a", "b", "c", "d"]  # commit actions in change order
    assert committed_ids(store.path) == order


def test_a_change_that_raises_in_a_group_is_undone_alone(store):
    ran: list[str] = []

    def good(name: str):
        def apply(tx: Transaction) -> None:
            tx.insert(session(name))
            tx.after_commit(lambda: ran.append(name))

        return apply

    def bad(tx: Transaction) -> None:
        tx.insert(session("bad"))
        tx.append_message("bad", message(1))
        tx.after_commit(lambda: ran.append("bad"))
        raise RuntimeError("half-way")

    outcome = group_of_writers(store, {"a": good("a"), "bad": bad, "c": good("c")})
    assert outcome["a"] is None and outcome["c"] is None
    assert str(outcome["bad"]) == "half-way"
    assert sorted(committed_ids(store.path)) == ["a", "c"]
    assert store.messages("bad", False, 10, 0) == ([], 0)
    assert sorted(ran) == ["a", "c"]


def test_reads_see_only_committed_changes(store):
    def insert(tx: Transaction) -> None:
        tx.insert(session("s1"))
        assert tx.get("s1") is not None  # the change sees itself
        assert store.get("s1") is None  # nobody else does before the commit

    store.write(insert)
    assert store.get("s1").id == "s1"


def test_a_lookup_by_id_does_not_wait_behind_a_page_read(store):
    """session.get is served on the bus I/O thread: a long page read must not hold it up."""
    store.write(lambda tx: tx.insert(session("s1")))
    with store._read_lock:  # as a page of list or messages being read on a handler thread
        found: list[SessionInfo | None] = []
        lookup = threading.Thread(target=lambda: found.append(store.get("s1")))
        lookup.start()
        lookup.join(5)
        assert [one.id for one in found] == ["s1"]


def test_a_change_may_not_wait_for_another_change(store):
    def nested(tx: Transaction) -> None:
        store.write(lambda inner: inner.insert(session("inner")))

    with pytest.raises(RuntimeError, match="wait for itself"):
        store.write(nested)
    assert store.get("inner") is None


def test_a_closed_store_refuses_changes(tmp_path):
    closed = SessionStore.in_data_dir(str(tmp_path / "data"))
    closed.close()
    with pytest.raises(StoreError, match="closed"):
        closed.write(lambda tx: tx.insert(session("s1")))


def test_writers_waiting_while_the_database_is_locked_are_refused_together(tmp_path, monkeypatch):
    """Another connection (the sqlite3 shell) holds the write lock past BUSY_TIMEOUT: the writers that
    waited meanwhile are refused with the first; one after the other, the n-th waited n x BUSY_TIMEOUT
    (64 queued: over ten minutes)."""
    from baaaht.services.sessions import store as store_module

    monkeypatch.setattr(store_module, "BUSY_TIMEOUT", 1.0)
    locked = SessionStore.in_data_dir(str(tmp_path / "data"))
    shell = sqlite3.connect(locked.path, isolation_level=None)
    shell.execute("BEGIN IMMEDIATE")
    refused_at: list[float] = []
    errors: list[BaseException] = []

    writing = threading.Event()

    def writer(n: int) -> None:
        writing.set()
        try:
            locked.write(lambda tx: tx.insert(session(f"s{n}")))
        except sqlite3.OperationalError as error:
            errors.append(error)
            refused_at.append(time.monotonic())

    try:
        first = threading.Thread(target=writer, args=(0,))
        first.start()
        assert writing.wait(5)
        wait_for(lambda: locked.writers_waiting == 0, 5, what="the committer to take the first change")
        others = [threading.Thread(target=writer, args=(n,)) for n in range(1, 6)]
        for thread in others:
            thread.start()
        wait_for(lambda: locked.writers_waiting == 5, 5, what="the others to queue")
        for thread in [first, *others]:
            thread.join(30)
        assert len(errors) == 6 and all("locked" in str(error) for error in errors)
        assert max(refused_at) - min(refused_at) < 0.5
    finally:
        shell.execute("ROLLBACK")
        shell.close()
        locked.close()
