"""One SQLite write transaction, for the stores that say BEGIN and COMMIT themselves."""

from __future__ import annotations

import sqlite3
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def write_transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE, committed (durably) when the block ends; rolled back if the block or the COMMIT
    raises. A failed COMMIT too: SQLite may leave the transaction open (SQLITE_FULL, SQLITE_IOERR),
    and every later BEGIN on the connection would then fail."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
