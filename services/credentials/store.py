"""SQLite adapter: the encrypted secrets, one file `<data_dir>/credentials/credentials.db`.

SQLite rather than a file per secret: a master-key rotation re-wraps every data key in one
transaction, which files cannot give, and a kill -9 at any moment leaves the last committed state
(WAL, synchronous=FULL: nothing is acknowledged before it is on disk). Deleted rows are overwritten
(secure_delete), so an erased version's wrapped data key does not linger in free pages.

Opening checks the whole store before anything is written, on a read-only connection: the schema,
SQLite's integrity check, the master key (see master.py) and every version's decryption. Any failure
refuses to start, naming the file and the cause; the file is never repaired, replaced or emptied.
A new store is made under a temporary name and renamed into place once its schema and master check
are committed, so an existing store file is always a complete one (an empty or cut one is corrupt).

One connection behind one lock: credential writes are rare and reads take microseconds.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import orjson

from baaaht.common.sqlite_write import write_transaction
from baaaht.schemas.credentials import CredentialInfo, CredentialVersion
from baaaht.services.credentials import crypto
from baaaht.services.credentials.master import Kdf, MasterKeyError, MasterSource, fsync_directory
from baaaht.services.credentials.source import Secret, SecretExpired, SecretNotFound

log = logging.getLogger("baaaht.credential.store")

STORE_DIR = "credentials"
STORE_FILE = "credentials.db"
NEW_SUFFIX = ".new"
SCHEMA_VERSION = 1
BUSY_TIMEOUT = 10.0

_SCHEMA = f"""
CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE secrets (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    description TEXT NOT NULL,
    version INTEGER NOT NULL,
    created_at REAL NOT NULL,
    rotated_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    last_used_at REAL NOT NULL,
    expiry_announced INTEGER NOT NULL
);
CREATE TABLE versions (
    secret_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    created_at REAL NOT NULL,
    retired_at REAL NOT NULL,
    erase_at REAL NOT NULL,
    wrapped_key BLOB NOT NULL,
    sealed_value BLOB NOT NULL,
    PRIMARY KEY (secret_id, version)
) WITHOUT ROWID;
PRAGMA user_version = {SCHEMA_VERSION};
"""

_SECRET_COLUMNS = (
    "id, name, kind, description, version, created_at, rotated_at, expires_at, last_used_at, seq"
)


class StoreRefused(Exception):
    """The store cannot be used: the service must not start. The message names the file and the cause."""


class CredentialExists(Exception):
    """A put of a name the store already holds."""

    def __init__(self, name: str):
        super().__init__(f"a credential named {name!r} exists: rotate it to change its value")
        self.name = name


def _connect(target: str, *, uri: bool = False) -> sqlite3.Connection:
    return sqlite3.connect(
        target, uri=uri, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT
    )


def _meta(db: sqlite3.Connection) -> tuple[bytes, Kdf | None]:
    rows = dict(db.execute("SELECT key, value FROM meta").fetchall())
    if "master_check" not in rows:
        raise ValueError("the master key check is missing")
    kdf = orjson.loads(rows["kdf"]) if "kdf" in rows else None
    return bytes(rows["master_check"]), kdf


def _write_meta(db: sqlite3.Connection, key: bytes, kdf: Kdf | None) -> None:
    db.execute("INSERT OR REPLACE INTO meta VALUES ('master_check', ?)", (crypto.master_check(key),))
    if kdf is None:
        db.execute("DELETE FROM meta WHERE key = 'kdf'")
    else:
        db.execute("INSERT OR REPLACE INTO meta VALUES ('kdf', ?)", (orjson.dumps(kdf),))


class CredentialStore:
    def __init__(self, path: Path, db: sqlite3.Connection, key: bytes, master: MasterSource, clock):
        self.path = path
        self._db = db
        self._key = key
        self.master = master
        self.clock = clock
        self._lock = threading.Lock()
        self._used: dict[str, float] = {}  # name -> last use not yet written
        self._used_lock = threading.Lock()

    # -- opening ------------------------------------------------------------------------------

    @classmethod
    def open(
        cls, data_dir: str, master: MasterSource, clock: Callable[[], float] = time.time
    ) -> "CredentialStore":
        """The store in data_dir, checked whole; StoreRefused (naming the file) if it cannot be used."""
        directory = Path(data_dir) / STORE_DIR
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        path = directory / STORE_FILE
        try:
            if path.exists():
                key = cls._unlock_existing(path, master)
            else:
                key = cls._create(path, master)
        except MasterKeyError as exc:
            raise StoreRefused(f"{path}: {exc}") from None
        except OSError as exc:  # a key file that cannot be read or made, a directory that is not one
            raise StoreRefused(f"{path}: {exc.strerror}: {exc.filename}") from None
        db = _connect(str(path))
        try:
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise StoreRefused(f"{path}: SQLite refused WAL mode (got {mode!r})")
            db.execute("PRAGMA synchronous = FULL")
            db.execute("PRAGMA secure_delete = ON")
        except BaseException:
            db.close()
            raise
        return cls(path, db, key, master, clock)

    @staticmethod
    def _unlock_existing(path: Path, master: MasterSource) -> bytes:
        """Check the store read-only, then find its key. Nothing is written: no WAL checkpoint, and
        without a WAL left by a crash not even SQLite's side files (immutable: there is nothing to merge)."""
        wal_left = path.with_name(path.name + "-wal").exists()
        try:
            db = _connect(f"{path.as_uri()}?mode=ro{'' if wal_left else '&immutable=1'}", uri=True)
        except sqlite3.Error as exc:
            raise StoreRefused(f"{path}: cannot open the store: {exc}") from None
        try:
            try:
                version = db.execute("PRAGMA user_version").fetchone()[0]
                if version != SCHEMA_VERSION:
                    raise StoreRefused(
                        f"{path}: schema version {version}, this version only knows {SCHEMA_VERSION}"
                        + (" (an empty or cut file?)" if version == 0 else "")
                    )
                problems = [row[0] for row in db.execute("PRAGMA integrity_check")]
                if problems != ["ok"]:
                    raise StoreRefused(f"{path}: corrupt: {'; '.join(problems[:5])}")
                check, kdf = _meta(db)
            except (sqlite3.Error, ValueError) as exc:
                raise StoreRefused(f"{path}: corrupt: {exc}") from None
            key = master.unlock(check, kdf)
            try:
                rows = db.execute(
                    "SELECT s.id, s.name, v.version, v.wrapped_key, v.sealed_value"
                    " FROM versions v LEFT JOIN secrets s ON s.id = v.secret_id"
                ).fetchall()
            except sqlite3.Error as exc:
                raise StoreRefused(f"{path}: corrupt: {exc}") from None
            for secret_id, name, version, wrapped, sealed in rows:
                if secret_id is None:
                    raise StoreRefused(f"{path}: corrupt: a version belongs to no secret")
                try:
                    crypto.open_version(key, secret_id, name, version, wrapped, sealed)
                except crypto.Undecryptable as exc:
                    raise StoreRefused(
                        f"{path}: corrupt: version {version} of credential {name!r} does not decrypt ({exc})"
                    ) from None
            return key
        finally:
            db.close()

    @staticmethod
    def _create(path: Path, master: MasterSource) -> bytes:
        key, kdf = master.create()
        new = path.with_name(path.name + NEW_SUFFIX)
        for leftover in (new, new.with_name(new.name + "-wal"), new.with_name(new.name + "-shm")):
            leftover.unlink(missing_ok=True)
        os.close(os.open(new, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
        db = _connect(str(new))
        try:
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = FULL")
            db.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            _write_meta(db, key, kdf)
            db.execute("COMMIT")
        finally:
            db.close()  # the last connection: checkpoints the WAL into the file and removes it
        fd = os.open(new, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(new, path)
        fsync_directory(path.parent)
        log.info("new credential store", extra={"path": str(path), "master": master.source})
        return key

    def __enter__(self) -> "CredentialStore":
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def close(self) -> None:
        self.flush_usage()
        with self._lock:
            self._db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One transaction, committed (durably) when the block ends, rolled back if it raises."""
        with self._lock, write_transaction(self._db) as db:
            yield db

    # -- reading ------------------------------------------------------------------------------

    def _info(self, db: sqlite3.Connection, row: tuple) -> CredentialInfo:
        secret_id, name, kind, description, version, created_at, rotated_at, expires_at, last_used_at, _ = row
        with self._used_lock:
            last_used_at = max(last_used_at, self._used.get(name, 0.0))
        versions = [
            CredentialVersion(version=v, created_at=c, retired_at=r, erase_at=e)
            for v, c, r, e in db.execute(
                "SELECT version, created_at, retired_at, erase_at FROM versions"
                " WHERE secret_id = ? ORDER BY version DESC",
                (secret_id,),
            )
        ]
        return CredentialInfo(
            id=secret_id,
            name=name,
            kind=kind,
            description=description,
            version=version,
            created_at=created_at,
            rotated_at=rotated_at,
            expires_at=expires_at,
            last_used_at=last_used_at,
            expired=bool(expires_at) and expires_at <= self.clock(),
            versions=versions,
        )

    @staticmethod
    def _row(db: sqlite3.Connection, name: str) -> tuple:
        row = db.execute(f"SELECT {_SECRET_COLUMNS} FROM secrets WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise SecretNotFound(name)
        return row

    def describe(self, name: str) -> CredentialInfo:
        with self._lock:
            return self._info(self._db, self._row(self._db, name))

    def list(self, limit: int, cursor: int) -> tuple[list[CredentialInfo], int]:
        """Secrets oldest first after `cursor`, and the cursor of the next page (0: none)."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_SECRET_COLUMNS} FROM secrets WHERE seq > ? ORDER BY seq LIMIT ?",
                (cursor, limit + 1),
            ).fetchall()
            page = rows[:limit]
            next_cursor = page[-1][-1] if len(rows) > limit else 0
            return [self._info(self._db, row) for row in page], next_cursor

    def secret_for(self, name: str) -> Secret:
        with self._lock:
            row = self._db.execute(
                "SELECT s.id, s.kind, s.version, s.expires_at, v.wrapped_key, v.sealed_value FROM secrets s"
                " JOIN versions v ON v.secret_id = s.id AND v.version = s.version WHERE s.name = ?",
                (name,),
            ).fetchone()
            if row is None:
                raise SecretNotFound(name)
            secret_id, kind, version, expires_at, wrapped, sealed = row
            if expires_at and expires_at <= self.clock():
                raise SecretExpired(name, expires_at)
            value = crypto.open_version(self._key, secret_id, name, version, wrapped, sealed)
        return Secret(name=name, kind=kind, version=version, value=value)

    def mark_used(self, name: str) -> None:
        with self._used_lock:
            self._used[name] = self.clock()

    # -- writing ------------------------------------------------------------------------------

    def put(self, name: str, kind: str, value: bytes, description: str, expires_at: float) -> CredentialInfo:
        secret_id = os.urandom(16).hex()
        now = self.clock()
        wrapped, sealed = crypto.seal_version(self._key, secret_id, name, 1, value)
        with self._write() as db:
            if db.execute("SELECT 1 FROM secrets WHERE name = ?", (name,)).fetchone():
                raise CredentialExists(name)
            db.execute(
                "INSERT INTO secrets (id, name, kind, description, version, created_at, rotated_at,"
                " expires_at, last_used_at, expiry_announced) VALUES (?, ?, ?, ?, 1, ?, 0, ?, 0, 0)",
                (secret_id, name, kind, description, now, expires_at),
            )
            db.execute("INSERT INTO versions VALUES (?, 1, ?, 0, 0, ?, ?)", (secret_id, now, wrapped, sealed))
            return self._info(db, self._row(db, name))

    def rotate(self, name: str, value: bytes, expires_at: float | None, grace: float) -> CredentialInfo:
        """A new current version; the previous one is retired and erased `grace` seconds from now."""
        now = self.clock()
        with self._write() as db:
            secret_id, _, _, _, version, *_ = self._row(db, name)
            new_version = version + 1
            wrapped, sealed = crypto.seal_version(self._key, secret_id, name, new_version, value)
            db.execute(
                "UPDATE versions SET retired_at = ?, erase_at = ? WHERE secret_id = ? AND version = ?",
                (now, now + grace, secret_id, version),
            )
            db.execute(
                "INSERT INTO versions VALUES (?, ?, ?, 0, 0, ?, ?)",
                (secret_id, new_version, now, wrapped, sealed),
            )
            db.execute(
                "UPDATE secrets SET version = ?, rotated_at = ? WHERE id = ?", (new_version, now, secret_id)
            )
            if expires_at is not None:
                db.execute(
                    "UPDATE secrets SET expires_at = ?, expiry_announced = 0 WHERE id = ?",
                    (expires_at, secret_id),
                )
            return self._info(db, self._row(db, name))

    def delete(self, name: str) -> str:
        """Erase the secret and its versions; its id."""
        with self._write() as db:
            secret_id = self._row(db, name)[0]
            db.execute("DELETE FROM versions WHERE secret_id = ?", (secret_id,))
            db.execute("DELETE FROM secrets WHERE id = ?", (secret_id,))
        with self._used_lock:
            self._used.pop(name, None)
        return secret_id

    def flush_usage(self) -> None:
        """Write the last uses recorded since the last flush (one transaction)."""
        with self._used_lock:
            used, self._used = self._used, {}
        if not used:
            return
        with self._write() as db:
            db.executemany(
                "UPDATE secrets SET last_used_at = MAX(last_used_at, ?) WHERE name = ?",
                [(at, name) for name, at in used.items()],
            )

    def erase_retired(self) -> list[tuple[str, int]]:
        """Erase the retired versions whose grace period is over; (name, version) of each."""
        now = self.clock()
        with self._write() as db:
            due = db.execute(
                "SELECT s.name, v.version FROM versions v JOIN secrets s ON s.id = v.secret_id"
                " WHERE v.retired_at > 0 AND v.erase_at <= ?",
                (now,),
            ).fetchall()
            db.execute("DELETE FROM versions WHERE retired_at > 0 AND erase_at <= ?", (now,))
        return due

    def announce_expired(self) -> list[tuple[str, str, float]]:
        """(id, name, expires_at) of each secret that expired since the last call: each is returned once."""
        now = self.clock()
        with self._write() as db:
            due = db.execute(
                "SELECT id, name, expires_at FROM secrets"
                " WHERE expires_at > 0 AND expires_at <= ? AND expiry_announced = 0 ORDER BY seq",
                (now,),
            ).fetchall()
            db.executemany("UPDATE secrets SET expiry_announced = 1 WHERE id = ?", [(row[0],) for row in due])
        return due

    def rotate_master(self) -> int:
        """Wrap every data key under a new master key in one transaction; the number re-wrapped."""
        with self._lock:
            new_key, kdf = self.master.begin_rotation(self._key)
            try:
                with write_transaction(self._db):
                    rows = self._db.execute(
                        "SELECT v.secret_id, s.name, v.version, v.wrapped_key FROM versions v"
                        " JOIN secrets s ON s.id = v.secret_id"
                    ).fetchall()
                    for secret_id, name, version, wrapped in rows:
                        data_key = crypto.unwrap(self._key, wrapped, secret_id, name, version)
                        self._db.execute(
                            "UPDATE versions SET wrapped_key = ? WHERE secret_id = ? AND version = ?",
                            (crypto.wrap(new_key, data_key, secret_id, name, version), secret_id, version),
                        )
                    _write_meta(self._db, new_key, kdf)
            except BaseException:
                self.master.abort_rotation()
                raise
            self._key = new_key
            self.master.finish_rotation()
        log.info("master key rotated", extra={"path": str(self.path), "rewrapped": len(rows)})
        return len(rows)
