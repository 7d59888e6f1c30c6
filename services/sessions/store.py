"""SQLite adapter: sessions and their conversations; concurrent changes share one commit.

Group commit: a change runs alone on the write connection, inside a savepoint of the open
transaction; when it ends and other writers are waiting for their turn, it leaves the
transaction open for them, and the last of the group (no one waiting, or the group is full)
commits for all: one transaction and one fsync for every change that was waiting. Each
writer returns only after that commit, so nothing is acknowledged before it is durable; a
change that raises is rolled back to its savepoint alone. Reads use their own connection
and see only committed data.

One file, `<data_dir>/sessions/sessions.db`. Session and owner ids are only ever SQL parameters,
never parts of a path. A session is a row with its id, state and owner as columns (for filters)
and the whole SessionInfo as JSON (readable with the sqlite3 shell); each message is a row keyed
by (session id, seq).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import msgspec

from baaaht.common.sqlite_pages import Filters, page
from baaaht.schemas.sessions import Message, SessionInfo, SessionState

log = logging.getLogger("baaaht.session.store")

SCHEMA_VERSION = 1
BUSY_TIMEOUT = 10.0  # seconds SQLite waits for a lock held by another connection (e.g. the sqlite3 shell)
MAX_GROUP = 64  # changes in one commit: bounds how long the first of a group waits for its commit
# Seconds a writer waits for its group's commit: the changes queued before it plus the commit itself.
COMMIT_WAIT = MAX_GROUP * BUSY_TIMEOUT
NO_UPPER_BOUND = 2**62

_SCHEMA = f"""
BEGIN IMMEDIATE;
CREATE TABLE sessions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    owner TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX sessions_by_state ON sessions (state, seq);
CREATE INDEX sessions_by_owner ON sessions (owner, seq);
CREATE TABLE messages (
    session_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (session_id, seq)
) WITHOUT ROWID;
PRAGMA user_version = {SCHEMA_VERSION};
COMMIT;
"""

_encode = msgspec.json.Encoder().encode
_session = msgspec.json.Decoder(SessionInfo)
_message = msgspec.json.Decoder(Message)


class StoreError(Exception):
    """The database cannot be used as it is (newer schema, not WAL): the service must not start."""


class Transaction:
    """The reads and writes of one change. Nothing is visible to others before the commit; a change
    sees the changes committed with it that came before it (they are serialized)."""

    def __init__(self, db: sqlite3.Connection):
        self._db = db
        self.on_commit: list[Callable[[], None]] = []

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Run callback once the change is durable, before the next group's changes start (so
        events published from here come out in commit order)."""
        self.on_commit.append(callback)

    def get(self, session_id: str) -> SessionInfo | None:
        row = self._db.execute("SELECT body FROM sessions WHERE id = ?", (session_id,)).fetchone()
        return _session.decode(row[0]) if row else None

    def insert(self, session: SessionInfo) -> None:
        self._db.execute(
            "INSERT INTO sessions (id, state, owner, body) VALUES (?, ?, ?, ?)",
            (session.id, session.state.value, session.owner, _encode(session)),
        )

    def put(self, session: SessionInfo) -> None:
        self._db.execute(
            "UPDATE sessions SET state = ?, body = ? WHERE id = ?",
            (session.state.value, _encode(session), session.id),
        )

    def delete(self, session_id: str) -> None:
        self._db.execute("DELETE FROM messages WHERE session_id = ?", (session_id,))
        self._db.execute("DELETE FROM sessions WHERE id = ?", (session_id,))

    def count_not_closed(self) -> int:
        closed = SessionState.CLOSED.value
        return self._db.execute("SELECT COUNT(*) FROM sessions WHERE state != ?", (closed,)).fetchone()[0]

    def append_message(self, session_id: str, message: Message) -> None:
        self._db.execute(
            "INSERT INTO messages (session_id, seq, body) VALUES (?, ?, ?)",
            (session_id, message.seq, _encode(message)),
        )

    def holding_container(self, container_id: str) -> list[SessionInfo]:
        rows = self._db.execute(
            "SELECT body FROM sessions WHERE EXISTS"
            " (SELECT 1 FROM json_each(body, '$.containers') WHERE json_extract(value, '$.id') = ?)",
            (container_id,),
        )
        return [_session.decode(body) for (body,) in rows]


class _Group:
    """Changes that share one transaction and one commit."""

    def __init__(self) -> None:
        self.changes: list[Transaction] = []
        self.committed = threading.Event()  # set when the group ends, committed or not
        self.error: BaseException | None = None  # why the group was not committed


class SessionStore:
    def __init__(self, path: str):
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)
        # Created 0600 before SQLite opens it: SQLite gives its -wal and -shm files the same mode.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        # isolation_level=None: no implicit transactions; `write` says BEGIN and COMMIT itself.
        self.path = path
        self._db = self._connect()
        try:
            self._configure()
            self._migrate()
            self._reader = self._connect()
            self._reader.execute("PRAGMA query_only = ON")
        except BaseException:
            self._db.close()
            raise
        self._read_lock = threading.Lock()
        self._turn = threading.Lock()  # one change at a time on the write connection
        self._queue_lock = threading.Lock()
        self._waiting = 0  # writers waiting for their turn
        self._group: _Group | None = None  # the open transaction's group

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT)

    @classmethod
    def in_data_dir(cls, data_dir: str) -> "SessionStore":
        return cls(os.path.join(data_dir, "sessions", "sessions.db"))

    def _configure(self) -> None:
        mode = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise StoreError(f"{self.path}: SQLite refused WAL mode (got {mode!r})")
        # Durability: in WAL mode, synchronous=NORMAL syncs only at checkpoints, so a commit
        # survives a crash of this process but the last commits can be lost on a power loss or a
        # kernel crash. We acknowledge a message only after its commit and promise that nothing
        # acknowledged is lost even when the whole host goes down, so FULL: the WAL is fsynced on
        # every commit. Group commit shares that fsync among the writers waiting (see bench/sessions.py).
        self._db.execute("PRAGMA synchronous = FULL")

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has schema version {version}; this version only knows {SCHEMA_VERSION}"
            )
        if version == 0:
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._turn, self._read_lock:
            self._reader.close()
            self._db.close()

    @property
    def writers_waiting(self) -> int:
        """Writers waiting for their turn: the changes that will join the open group."""
        with self._queue_lock:
            return self._waiting

    @contextmanager
    def write(self) -> Iterator[Transaction]:
        """One change: durable when the block ends (the call returns after its group's commit),
        rolled back if it raises. Changes are serialized, so reads inside the block see what the
        change is based on."""
        group = self._take_turn()
        tx = Transaction(self._db)
        failure: BaseException | None = None
        try:
            self._db.execute("SAVEPOINT change")
            try:
                yield tx
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK TO change")
                raise
            finally:
                if self._db.in_transaction:
                    self._db.execute("RELEASE change")
            group.changes.append(tx)
        except BaseException as error:
            failure = error
            if not self._db.in_transaction:  # SQLite rolled the whole transaction back (disk full, I/O)
                group.error = error
        finally:
            self._end_turn(group)
        # Even a change that failed waits: its answer was based on the changes before it in the group.
        if not group.committed.wait(COMMIT_WAIT):
            raise StoreError(f"{self.path}: the commit did not complete within {COMMIT_WAIT:g}s")
        if failure is not None:
            raise failure
        if group.error is not None:
            raise StoreError(f"{self.path}: the change was not committed: {group.error}") from group.error

    def _take_turn(self) -> _Group:
        """Wait for the write connection; the open group, or a new one with its transaction begun."""
        with self._queue_lock:
            self._waiting += 1
        self._turn.acquire()
        with self._queue_lock:
            self._waiting -= 1
        if self._group is not None:
            return self._group
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._turn.release()
            raise
        self._group = _Group()
        return self._group

    def _end_turn(self, group: _Group) -> None:
        """Leave the transaction open for the next writer, or commit the group and tell its writers."""
        with self._queue_lock:
            others_waiting = self._waiting > 0
        if group.error is None and others_waiting and len(group.changes) < MAX_GROUP:
            self._turn.release()  # a waiting writer is sure to take the turn and end it in turn
            return
        self._group = None
        try:
            if group.error is None:
                self._db.execute("COMMIT")
        except BaseException as error:
            group.error = error
        try:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            if group.error is None:
                self._run_commit_actions(group)
        finally:
            group.committed.set()
            self._turn.release()

    @staticmethod
    def _run_commit_actions(group: _Group) -> None:
        for tx in group.changes:
            for callback in tx.on_commit:
                try:
                    callback()
                except Exception:
                    # The change is durable and acknowledged whatever happens to its notification.
                    log.exception("after-commit action failed")

    def get(self, session_id: str) -> SessionInfo | None:
        with self._read_lock:
            return Transaction(self._reader).get(session_id)

    def in_states(self, states: Iterable[SessionState]) -> list[SessionInfo]:
        values = [state.value for state in states]
        marks = ",".join("?" * len(values))
        with self._read_lock:
            rows = self._reader.execute(
                f"SELECT body FROM sessions WHERE state IN ({marks}) ORDER BY seq", values
            )
            return [_session.decode(body) for (body,) in rows]

    def list(
        self,
        states: Iterable[SessionState],
        owner: str,
        labels: dict[str, str],
        limit: int,
        cursor: int,
    ) -> tuple[list[SessionInfo], int]:
        """Matching sessions oldest first after `cursor`, and the cursor of the next page (0: none)."""
        filters = Filters(cursor).one_of("state", [state.value for state in states]).equal("owner", owner)
        for key, value in labels.items():
            filters.add(
                "EXISTS (SELECT 1 FROM json_each(body, '$.labels') WHERE key = ? AND value = ?)", key, value
            )
        with self._read_lock:
            return page(self._reader, "sessions", filters, limit, _session.decode)

    def messages(
        self, session_id: str, newest_first: bool, limit: int, cursor: int
    ) -> tuple[list[Message], int]:
        """One page of a conversation past `cursor` (a seq) in the order asked, and the next cursor."""
        if newest_first:
            sql = "SELECT seq, body FROM messages WHERE session_id = ? AND seq < ? ORDER BY seq DESC LIMIT ?"
            bound = cursor or NO_UPPER_BOUND
        else:
            sql = "SELECT seq, body FROM messages WHERE session_id = ? AND seq > ? ORDER BY seq LIMIT ?"
            bound = cursor
        with self._read_lock:
            rows = self._reader.execute(sql, (session_id, bound, limit + 1)).fetchall()
        page = rows[:limit]
        next_cursor = page[-1][0] if len(rows) > limit else 0
        return [_message.decode(body) for _, body in page], next_cursor
