"""SQLite adapter of the scheduler: tasks, idempotency keys and schedules, in `<data_dir>/scheduler/`.

One writer, the engine's thread: it applies every change that came in at once in one transaction and
one commit (`batch`), and answers their callers only after that commit, so an acknowledged submit is
durable and many submits share one fsync. Readers (task.get, task.list) have their own connection and
see only committed data. WAL with synchronous=FULL: a commit survives a crash of the host as well.

A task is a row with the columns its filters need and the whole TaskInfo as msgpack. Finished tasks
are pruned once they are older than `scheduler.task_retention` (`drop_finished_before`).
"""

from __future__ import annotations

import os
import sqlite3
import threading
from contextlib import contextmanager
from typing import Iterable, Iterator

import msgspec

from baaaht.common.sqlite_pages import Filters, page
from baaaht.common.sqlite_write import write_transaction
from baaaht.schemas.tasks import TERMINAL, ScheduleInfo, TaskInfo, TaskState

SCHEMA_VERSION = 2
BUSY_TIMEOUT = 10.0
PRUNE_BATCH = 10_000  # finished tasks deleted in one transaction at most: the rest go at the next sweep

_SCHEMA = f"""
BEGIN IMMEDIATE;
CREATE TABLE tasks (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    queue TEXT NOT NULL,
    state TEXT NOT NULL,
    session_id TEXT NOT NULL,
    lease_id TEXT NOT NULL DEFAULT '',  -- the current lease's secret: never in the TaskInfo others read
    worker_key TEXT NOT NULL DEFAULT '',
    body BLOB NOT NULL,
    finished_at REAL NOT NULL DEFAULT 0
);
CREATE INDEX tasks_by_state ON tasks (state, seq);
CREATE INDEX tasks_by_finish ON tasks (finished_at) WHERE finished_at > 0;
CREATE INDEX tasks_by_queue ON tasks (queue, seq);
CREATE INDEX tasks_by_session ON tasks (session_id, seq);
CREATE TABLE task_keys (
    session_id TEXT NOT NULL,
    key TEXT NOT NULL,
    task_id TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (session_id, key)
) WITHOUT ROWID;
CREATE TABLE schedules (
    id TEXT PRIMARY KEY,
    session_id TEXT NOT NULL,
    body BLOB NOT NULL
) WITHOUT ROWID;
PRAGMA user_version = {SCHEMA_VERSION};
COMMIT;
"""

_encode = msgspec.msgpack.Encoder().encode
_task = msgspec.msgpack.Decoder(TaskInfo)
_schedule = msgspec.msgpack.Decoder(ScheduleInfo)
_LIVE = [state.value for state in TaskState if state not in TERMINAL]


class StoreError(Exception):
    """The database cannot be used as it is (newer schema, not WAL): the service must not start."""


class Batch:
    """The writes of one engine turn: committed together, or not at all."""

    def __init__(self, db: sqlite3.Connection):
        self._db = db

    def put_task(self, task: TaskInfo, lease_id: str = "", worker_key: str = "") -> None:
        self.put_row(task_row(task, lease_id, worker_key))

    def put_row(self, row: tuple) -> None:
        """A task's row as `task_row` made it."""
        self._db.execute(
            "INSERT INTO tasks (id, queue, state, session_id, lease_id, worker_key, body, finished_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET state = excluded.state,"
            " lease_id = excluded.lease_id, worker_key = excluded.worker_key, body = excluded.body,"
            " finished_at = excluded.finished_at",
            row,
        )

    def drop_finished_before(self, finished_at: float) -> None:
        """Forget (at most PRUNE_BATCH of) the tasks that finished before `finished_at`."""
        self._db.execute(
            "DELETE FROM tasks WHERE seq IN (SELECT seq FROM tasks WHERE finished_at > 0 AND finished_at < ?"
            " ORDER BY finished_at LIMIT ?)",
            (finished_at, PRUNE_BATCH),
        )

    def get_task(self, task_id: str) -> TaskInfo | None:
        return _get_task(self._db, task_id)

    def put_key(self, session_id: str, key: str, task_id: str, created_at: float) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO task_keys (session_id, key, task_id, created_at) VALUES (?, ?, ?, ?)",
            (session_id, key, task_id, created_at),
        )

    def drop_keys_before(self, created_at: float) -> None:
        self._db.execute("DELETE FROM task_keys WHERE created_at < ?", (created_at,))

    def put_schedule_row(self, row: tuple) -> None:
        """A schedule's row as `schedule_row` made it."""
        self._db.execute("INSERT OR REPLACE INTO schedules (id, session_id, body) VALUES (?, ?, ?)", row)

    def remove_schedule(self, schedule_id: str) -> None:
        self._db.execute("DELETE FROM schedules WHERE id = ?", (schedule_id,))


def task_row(task: TaskInfo, lease_id: str = "", worker_key: str = "") -> tuple:
    """The task as its row holds it, encoded now (a later change of `task` does not change the row)."""
    return (
        task.id,
        task.queue,
        task.state.value,
        task.session_id,
        lease_id,
        worker_key,
        _encode(task),
        task.finished_at if task.state in TERMINAL else 0.0,
    )


def schedule_row(schedule: ScheduleInfo) -> tuple:
    return (schedule.id, schedule.session_id, _encode(schedule))


def _get_task(db: sqlite3.Connection, task_id: str) -> TaskInfo | None:
    row = db.execute("SELECT body FROM tasks WHERE id = ?", (task_id,)).fetchone()
    return _task.decode(row[0]) if row else None


class SchedulerStore:
    def __init__(self, path: str):
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))  # SQLite gives -wal and -shm this mode
        self.path = path
        self._db = self._connect()
        try:
            mode = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise StoreError(f"{path}: SQLite refused WAL mode (got {mode!r})")
            self._db.execute("PRAGMA synchronous = FULL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(f"{path} has schema version {version}; this version knows {SCHEMA_VERSION}")
            if version == 0:
                self._db.executescript(_SCHEMA)
            elif version == 1:
                self._migrate_from_1()
            self._reader = self._connect()
            self._reader.execute("PRAGMA query_only = ON")
        except BaseException:
            self._db.close()
            raise
        self._read_lock = threading.Lock()

    def _migrate_from_1(self) -> None:
        """Version 1 had no finished_at column: add it, filled from the finished tasks' bodies."""
        with write_transaction(self._db) as db:
            db.execute("ALTER TABLE tasks ADD COLUMN finished_at REAL NOT NULL DEFAULT 0")
            db.execute("CREATE INDEX tasks_by_finish ON tasks (finished_at) WHERE finished_at > 0")
            finished = [state.value for state in TERMINAL]
            rows = db.execute(
                f"SELECT seq, body FROM tasks WHERE state IN ({','.join('?' * len(finished))})", finished
            ).fetchall()
            db.executemany(
                "UPDATE tasks SET finished_at = ? WHERE seq = ?",
                [(_task.decode(body).finished_at, seq) for seq, body in rows],
            )
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @classmethod
    def in_data_dir(cls, data_dir: str) -> "SchedulerStore":
        return cls(os.path.join(data_dir, "scheduler", "tasks.db"))

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: no implicit transactions; `batch` says BEGIN and COMMIT itself.
        return sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT)

    def close(self) -> None:
        with self._read_lock:
            self._reader.close()
            self._db.close()

    @contextmanager
    def batch(self) -> Iterator[Batch]:
        """One transaction on the writer connection (the engine's thread only): durable when the block
        ends, rolled back whole if it raises."""
        with write_transaction(self._db) as db:
            yield Batch(db)

    # -- what the engine loads at start (writer connection, before it serves) ----------------------

    def live_tasks(self) -> list[tuple[TaskInfo, str, str]]:
        """(task, lease id, worker key) of every unfinished task, oldest first."""
        marks = ",".join("?" * len(_LIVE))
        rows = self._db.execute(
            f"SELECT body, lease_id, worker_key FROM tasks WHERE state IN ({marks}) ORDER BY seq", _LIVE
        )
        return [(_task.decode(body), lease_id, worker_key) for body, lease_id, worker_key in rows]

    def keys_since(self, created_at: float) -> list[tuple[str, str, str, float]]:
        rows = self._db.execute(
            "SELECT session_id, key, task_id, created_at FROM task_keys WHERE created_at >= ?", (created_at,)
        )
        return [tuple(row) for row in rows]

    def schedules(self) -> list[ScheduleInfo]:
        rows = self._db.execute("SELECT body FROM schedules ORDER BY id")
        return [_schedule.decode(body) for (body,) in rows]

    # -- reads (any thread) ------------------------------------------------------------------------

    def get(self, task_id: str) -> TaskInfo | None:
        with self._read_lock:
            return _get_task(self._reader, task_id)

    def list(
        self, states: Iterable[TaskState], queue: str, session_id: str, limit: int, cursor: int
    ) -> tuple[list[TaskInfo], int]:
        """Matching tasks oldest first after `cursor`, and the cursor of the next page (0: none)."""
        filters = Filters(cursor).one_of("state", [state.value for state in states])
        filters.equal("queue", queue).equal("session_id", session_id)
        with self._read_lock:
            return page(self._reader, "tasks", filters, limit, _task.decode)

    def list_schedules(self, session_id: str) -> list[ScheduleInfo]:
        sql, params = "SELECT body FROM schedules ORDER BY id", ()
        if session_id:
            sql, params = "SELECT body FROM schedules WHERE session_id = ? ORDER BY id", (session_id,)
        with self._read_lock:
            return [_schedule.decode(body) for (body,) in self._reader.execute(sql, params)]
