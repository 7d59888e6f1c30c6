"""SQLite adapter: sessions and their conversations; concurrent changes share one commit.

Group commit: a change is a function of a Transaction, queued for the one committer thread,
which owns the write connection. It takes every change waiting (up to MAX_GROUP), runs them one
after the other in one transaction, each inside a savepoint, and commits them together: one
transaction and one fsync for every change that was waiting, with no thread handing a turn to
the next. A change that raises is rolled back to its savepoint alone. Each writer returns only
after that commit, so nothing is acknowledged before it is durable; the commit actions (events)
run on the committer in change order before the next group begins. Reads use their own
connection and see only committed data.

One file, `<data_dir>/sessions/sessions.db`. Session and owner ids are only ever SQL parameters,
never parts of a path. A session is a row with its id, state and owner as columns (for filters)
and the whole SessionInfo as JSON (readable with the sqlite3 shell); each message is a row keyed
by (session id, seq).
"""

from __future__ import annotations

import logging
import os
import queue
import sqlite3
import threading
from typing import Callable, Iterable, TypeVar

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
T = TypeVar("T")
Answer = Callable[[object, BaseException | None], None]

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


class _Change:
    """One writer's change waiting for the committer, and what became of it."""

    __slots__ = ("apply", "then", "state", "result", "error", "done")

    def __init__(self, apply: Callable[[Transaction], object], then: Answer | None = None):
        self.apply = apply
        self.then = then  # called on the committer with (result, error) once the group is over
        self.state = _QUEUED
        self.result: object = None
        self.error: BaseException | None = None  # what the change raised, or why it was not committed
        # Released by the committer once the change's group is over: a lock, cheaper than an Event.
        self.done = threading.Lock()
        self.done.acquire()


_QUEUED, _STARTED, _ABANDONED = range(3)


class SessionStore:
    def __init__(self, path: str):
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)
        # Created 0600 before SQLite opens it: SQLite gives its -wal and -shm files the same mode.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        # isolation_level=None: no implicit transactions; the committer says BEGIN and COMMIT itself.
        self.path = path
        self._db = self._connect()
        try:
            self._configure()
            self._migrate()
            self._reader = self._reader_connection()
            # Lookups by id have their own: session.get is served on the bus I/O thread
            # (bus/service.py rpc inline), which must not wait behind a page of list or messages.
            self._id_reader = self._reader_connection()
        except BaseException:
            self._db.close()
            raise
        self._read_lock = threading.Lock()
        self._id_read_lock = threading.Lock()
        self._pending: queue.SimpleQueue[_Change | None] = queue.SimpleQueue()  # None: stop
        self._state_lock = threading.Lock()  # a change is started by the committer or abandoned by its writer
        self._closed = False
        self._committer = threading.Thread(
            target=self._commit_changes, name="session-store-commit", daemon=True
        )
        self._committer.start()

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT)

    def _reader_connection(self) -> sqlite3.Connection:
        """A connection that only reads: in WAL mode it sees the last commit, never waiting for the writer."""
        reader = self._connect()
        reader.execute("PRAGMA query_only = ON")
        return reader

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
        """Commit the changes already queued, then close; a change written from now on is refused."""
        self._closed = True
        self._pending.put(None)
        self._committer.join(COMMIT_WAIT)
        while True:  # queued after the stop (a writer that raced close()): never run
            try:
                change = self._pending.get_nowait()
            except queue.Empty:
                break
            if change is not None:
                self._finish(change, StoreError(f"{self.path}: the store is closed"))
        with self._read_lock, self._id_read_lock:
            self._reader.close()
            self._id_reader.close()
            self._db.close()

    @property
    def writers_waiting(self) -> int:
        """Changes waiting for the committer: they join the next group."""
        return self._pending.qsize()

    def submit(
        self, apply: Callable[[Transaction], T], then: Callable[[T | None, BaseException | None], None]
    ) -> None:
        """`write` without the wait: `then(result, error)` is called on the committer thread once the
        change's group is over (after its commit actions). `then` must not wait for the store."""
        self._queue(_Change(apply, then))

    def _queue(self, change: _Change) -> _Change:
        if threading.current_thread() is self._committer:
            raise RuntimeError("a change cannot wait for another change: it would wait for itself")
        if self._closed:
            raise StoreError(f"{self.path}: the store is closed")
        self._pending.put(change)
        return change

    def write(self, apply: Callable[[Transaction], T]) -> T:
        """One change: `apply(tx)` runs on the committer thread, alone on the write connection, and
        its result is returned once it is durable (after its group's commit). What it raises is raised
        here, with the change rolled back alone; it still waits for the group's commit, since its answer
        was based on the changes before it. Changes are serialized, so reads inside `apply` see what
        the change is based on."""
        change = self._queue(_Change(apply))
        if not change.done.acquire(timeout=COMMIT_WAIT):
            with self._state_lock:
                started = change.state == _STARTED
                change.state = _ABANDONED
            # Not started: it never will be. Started: its commit is stuck; its outcome is unknown.
            outcome = "started but its commit did not complete" if started else "did not start"
            raise StoreError(f"{self.path}: the change {outcome} within {COMMIT_WAIT:g}s")
        if change.error is not None:
            raise change.error
        return change.result  # type: ignore[return-value]

    # -- the committer thread -----------------------------------------------------------------

    def _commit_changes(self) -> None:
        """Commit groups of changes until told to stop."""
        while (first := self._pending.get()) is not None:
            taken: list[_Change] = []
            try:
                if not self._commit_group(first, taken):
                    return
            except Exception:  # a bug here must not leave writers waiting for COMMIT_WAIT
                log.exception("committing a group failed")
                self._abort(taken)

    def _abort(self, taken: list[_Change]) -> None:
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")
        for change in taken:
            if change.done.locked():  # not answered yet (only this thread answers)
                self._finish(change, StoreError(f"{self.path}: the change was not committed"))

    def _commit_group(self, change: _Change, taken: list[_Change]) -> bool:
        """One transaction for `change` and every change queued while the group runs (up to MAX_GROUP),
        then one commit; False once the stop was taken from the queue."""
        # In change order; a change undone alone (tx None) is answered after the commit all the same.
        ended: list[tuple[_Change, Transaction | None]] = []
        while True:
            taken.append(change)
            if self._start(change):
                if not ended and not self._db.in_transaction:
                    try:
                        self._db.execute("BEGIN IMMEDIATE")
                    except Exception as error:  # locked by another connection past BUSY_TIMEOUT, I/O
                        self._finish(change, error)
                        return self._refuse_waiting(error)
                tx = Transaction(self._db)
                if self._apply(change, tx):
                    ended.append((change, tx))
                elif self._db.in_transaction:
                    ended.append((change, None))
                else:  # SQLite rolled the whole transaction back (disk full, I/O): none of the group stands
                    self._end_group([*ended, (change, None)], change.error)
                    return True  # the changes still queued get a transaction of their own
            if len(ended) >= MAX_GROUP:
                break
            try:
                change = self._pending.get_nowait()
            except queue.Empty:
                break
            if change is None:
                self._end_group(ended, None)
                return False
        self._end_group(ended, None)
        return True

    def _refuse_waiting(self, error: Exception) -> bool:
        """The changes queued while a BEGIN could not get the database are refused with its error too:
        they waited as long, and one BEGIN after the other the n-th would wait n x BUSY_TIMEOUT. False
        once the stop was taken."""
        while True:
            try:
                change = self._pending.get_nowait()
            except queue.Empty:
                return True
            if change is None:
                return False
            if self._start(change):
                self._finish(change, error)

    def _start(self, change: _Change) -> bool:
        """Whether the change is to run: its writer may have given up waiting."""
        with self._state_lock:
            if change.state != _QUEUED:
                return False
            change.state = _STARTED
            return True

    def _apply(self, change: _Change, tx: Transaction) -> bool:
        """Run the change in a savepoint; whether it stands (else change.error says why)."""
        try:
            self._db.execute("SAVEPOINT change")
            try:
                change.result = change.apply(tx)
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK TO change")
                raise
            finally:
                if self._db.in_transaction:
                    self._db.execute("RELEASE change")
        except BaseException as error:
            change.error = error
            return False
        return True

    def _end_group(
        self, ended: list[tuple[_Change, Transaction | None]], failure: BaseException | None
    ) -> None:
        """Commit (unless `failure` already undid the transaction), run the commit actions in change
        order, then answer the writers: a change that raised with what it raised, the others with
        nothing, or why the group was not committed."""
        if not ended:
            return
        if failure is None:
            try:
                self._db.execute("COMMIT")
            except Exception as error:
                failure = error
        if self._db.in_transaction:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error:
                log.exception("rollback after a failed commit failed")
        not_committed = None
        if failure is not None:
            not_committed = StoreError(f"{self.path}: the change was not committed: {failure}")
            not_committed.__cause__ = failure
        else:
            for _change, tx in ended:
                if tx is not None:
                    self._run_commit_actions(tx)
        for change, tx in ended:
            self._finish(change, not_committed if tx is not None else change.error)

    @staticmethod
    def _finish(change: _Change, error: BaseException | None) -> None:
        change.error = error
        if change.then is not None:
            try:
                change.then(None if error is not None else change.result, error)
            except Exception:
                log.exception("answering a change failed")
        change.done.release()

    @staticmethod
    def _run_commit_actions(tx: Transaction) -> None:
        for callback in tx.on_commit:
            try:
                callback()
            except Exception:
                # The change is durable and acknowledged whatever happens to its notification.
                log.exception("after-commit action failed")

    def get(self, session_id: str) -> SessionInfo | None:
        with self._id_read_lock:
            return Transaction(self._id_reader).get(session_id)

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
