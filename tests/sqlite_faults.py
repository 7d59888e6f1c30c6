"""A SQLite connection that fails the way the disk makes it fail, for the stores' tests."""

from __future__ import annotations

import sqlite3


class FailingCommit:
    """A connection whose next COMMIT fails and leaves the transaction open, as SQLite may after
    SQLITE_FULL or SQLITE_IOERR ("may or may not be rolled back automatically")."""

    def __init__(self, db: sqlite3.Connection):
        self._db = db
        self.fail_next = False

    def execute(self, sql: str, *args):
        if sql == "COMMIT" and self.fail_next:
            self.fail_next = False
            raise sqlite3.OperationalError("database or disk is full")
        return self._db.execute(sql, *args)

    def __getattr__(self, name: str):
        return getattr(self._db, name)
