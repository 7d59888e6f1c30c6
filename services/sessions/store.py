"""SQLite adapter: sessions and their conversations, one transaction per change.

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

from baaaht.schemas.sessions import Message, SessionInfo, SessionState

log = logging.getLogger("baaaht.session.store")

SCHEMA_VERSION = 1
BUSY_TIMEOUT = 10.0  # seconds SQLite waits for a lock held by another connection (e.g. the sqlite3 shell)
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
    """The reads and writes of one change. Nothing is visible to others before the commit."""

    def __init__(self, db: sqlite3.Connection):
        self._db = db
        self.on_commit: list[Callable[[], None]] = []

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Run callback once the change is durable, before the next change starts (so events
        published from here come out in commit order)."""
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


class SessionStore:
    def __init__(self, path: str):
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)
        # Created 0600 before SQLite opens it: SQLite gives its -wal and -shm files the same mode.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        # isolation_level=None: no implicit transactions; `write` says BEGIN and COMMIT itself.
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT)
        self._lock = threading.Lock()
        try:
            self._configure()
            self._migrate()
        except BaseException:
            self._db.close()
            raise

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
        # every commit. The price is one fsync per change (see bench/sessions.py).
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
        with self._lock:
            self._db.close()

    @contextmanager
    def write(self) -> Iterator[Transaction]:
        """One change: committed when the block ends, rolled back if it raises. Changes are
        serialized, so reads inside the block see what the change is based on."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            tx = Transaction(self._db)
            try:
                yield tx
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            for callback in tx.on_commit:
                try:
                    callback()
                except Exception:
                    # The change is durable and acknowledged whatever happens to its notification.
                    log.exception("after-commit action failed")

    def get(self, session_id: str) -> SessionInfo | None:
        with self._lock:
            return Transaction(self._db).get(session_id)

    def in_states(self, states: Iterable[SessionState]) -> list[SessionInfo]:
        values = [state.value for state in states]
        marks = ",".join("?" * len(values))
        with self._lock:
            rows = self._db.execute(
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
        where, params = ["seq > ?"], [cursor]
        values = [state.value for state in states]
        if values:
            where.append(f"state IN ({','.join('?' * len(values))})")
            params.extend(values)
        if owner:
            where.append("owner = ?")
            params.append(owner)
        for key, value in labels.items():
            where.append("EXISTS (SELECT 1 FROM json_each(body, '$.labels') WHERE key = ? AND value = ?)")
            params.extend((key, value))
        sql = f"SELECT seq, body FROM sessions WHERE {' AND '.join(where)} ORDER BY seq LIMIT ?"
        with self._lock:
            rows = self._db.execute(sql, [*params, limit + 1]).fetchall()
        page = rows[:limit]
        next_cursor = page[-1][0] if len(rows) > limit else 0
        return [_session.decode(body) for _, body in page], next_cursor

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
        with self._lock:
            rows = self._db.execute(sql, (session_id, bound, limit + 1)).fetchall()
        page = rows[:limit]
        next_cursor = page[-1][0] if len(rows) > limit else 0
        return [_message.decode(body) for _, body in page], next_cursor
