"""Where the per-session egress totals are kept across restarts: `<data_dir>/egress/usage.db` (SQLite).

The proxy never writes per call: a saver thread takes the sessions changed since its last turn
(Budgets.take_changes) every SAVE_INTERVAL and writes them in one transaction (WAL, synchronous=NORMAL:
a committed transaction survives the death of the process, kill -9 included; only a power cut can lose
the last ones). So a kill -9 of the credential service loses at most the usage of the calls of the
last SAVE_INTERVAL (1 s); a clean stop saves everything.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from pathlib import Path

from baaaht.common.sqlite_write import write_transaction
from baaaht.schemas.egress import SessionUsage

from .budgets import Budgets

log = logging.getLogger("baaaht.egress.usage")

USAGE_DIR = "egress"
USAGE_FILE = "usage.db"
SAVE_INTERVAL = 1.0  # seconds between saves: what a kill -9 can lose
BUSY_TIMEOUT = 5.0  # seconds SQLite waits for a lock
_COUNTERS = ("requests", "refused", "input_tokens", "output_tokens", "bytes_out", "bytes_in")
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS session_usage (
    session_id TEXT PRIMARY KEY,
    {", ".join(f"{name} INTEGER NOT NULL" for name in _COUNTERS)}
) WITHOUT ROWID
"""
_UPSERT = (
    f"INSERT INTO session_usage (session_id, {', '.join(_COUNTERS)})"
    f" VALUES ({', '.join('?' * (len(_COUNTERS) + 1))})"
    f" ON CONFLICT (session_id) DO UPDATE SET {', '.join(f'{name} = excluded.{name}' for name in _COUNTERS)}"
)


class UsageStoreError(RuntimeError):
    """The usage file cannot be used; the message names it and the cause."""


def usage_path(data_dir: str | Path) -> Path:
    return Path(data_dir) / USAGE_DIR / USAGE_FILE


class UsageStore:
    def __init__(self, path: Path):
        self.path = path
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                str(path), timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = NORMAL")
            self._db.execute(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise UsageStoreError(f"{path}: cannot open the egress usage store: {exc}") from None
        os.chmod(path, 0o600)
        self._lock = threading.Lock()

    def load(self) -> list[SessionUsage]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT session_id, {', '.join(_COUNTERS)} FROM session_usage ORDER BY session_id"
            ).fetchall()
        return [SessionUsage(session_id=row[0], **dict(zip(_COUNTERS, row[1:], strict=True))) for row in rows]

    def save(self, sessions: list[SessionUsage]) -> None:
        if not sessions:
            return
        rows = [(usage.session_id, *(getattr(usage, name) for name in _COUNTERS)) for usage in sessions]
        with self._lock, write_transaction(self._db) as db:
            db.executemany(_UPSERT, rows)

    def delete(self, session_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM session_usage WHERE session_id = ?", (session_id,))

    def close(self) -> None:
        with self._lock:
            self._db.close()


class UsageSaver:
    """Restores a Budgets' totals from the store at start, saves its changes every SAVE_INTERVAL on its
    own thread, and everything at stop."""

    def __init__(self, budgets: Budgets, path: Path, interval: float = SAVE_INTERVAL):
        self.budgets = budgets
        self.path = path
        self.interval = interval
        self.store: UsageStore | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._saving = threading.Lock()  # a save's take and write, or a forget, at a time

    def start(self) -> None:
        self.store = UsageStore(self.path)
        self.budgets.restore(self.store.load())
        self._thread = threading.Thread(target=self._run, name="egress-usage", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.wait(self.interval):
            self.save()

    def save(self) -> None:
        assert self.store is not None, "start the saver first"
        with self._saving:
            changes = self.budgets.take_changes()
            try:
                self.store.save(changes)
            except sqlite3.Error as exc:  # kept for the next turn: nothing counted is dropped
                self.budgets.put_back(changes)
                log.error("egress usage not saved", extra={"path": str(self.path), "reason": str(exc)})

    def forget(self, session_id: str) -> None:
        """The session was deleted: its totals go, here and in the file; under the save lock, so a save in
        progress (its copy taken, not yet written) cannot write the row back."""
        assert self.store is not None, "start the saver first"
        with self._saving:
            self.budgets.forget(session_id)
            self.store.delete(session_id)

    def stop(self) -> None:
        if self.store is None:
            return
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(self.interval + BUSY_TIMEOUT)
        self.save()
        self.store.close()
