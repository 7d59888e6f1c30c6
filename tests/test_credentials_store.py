"""The credential store on a temporary directory: encryption, its bindings, refusals, rotation, expiry."""

from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path

import pytest

from baaaht.schemas.credentials import CredentialPut
from baaaht.services.credentials import crypto, master
from baaaht.services.credentials.master import KeyFile, Passphrase
from baaaht.services.credentials.source import Secret, SecretExpired, SecretNotFound
from baaaht.services.credentials.store import (
    STORE_DIR,
    STORE_FILE,
    CredentialExists,
    CredentialStore,
    StoreRefused,
)
from tests.session_doubles import FakeClock

VALUE = b"sk-ant-test-0123456789abcdef"


@pytest.fixture
def paths(tmp_path):
    return tmp_path / "data", tmp_path / "keys" / "master.key"


@pytest.fixture
def clock():
    return FakeClock(1_800_000_000.0)


@pytest.fixture
def open_store(paths, clock):
    data_dir, key_file = paths
    opened = []

    def open_(key_path: Path | None = None, source=None) -> CredentialStore:
        store = CredentialStore.open(str(data_dir), source or KeyFile(str(key_path or key_file)), clock)
        opened.append(store)
        return store

    yield open_
    for store in opened:
        try:
            store.close()
        except sqlite3.ProgrammingError:
            pass  # closed by the test


def store_file(paths) -> Path:
    return paths[0] / STORE_DIR / STORE_FILE


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def listing(directory: Path) -> dict[str, str]:
    return {p.name: digest(p) for p in directory.iterdir()}


def test_a_secret_round_trips_across_a_reopen_and_never_shows_its_value(open_store, paths):
    store = open_store()
    info = store.put("anthropic", "api_key", VALUE, "the team key", 0.0)
    assert (info.name, info.kind, info.version, info.description) == (
        "anthropic",
        "api_key",
        1,
        "the team key",
    )
    secret = store.secret_for("anthropic")
    assert secret == Secret(name="anthropic", kind="api_key", version=1, value=VALUE)
    assert VALUE.decode() not in repr(secret) + str(secret) + repr([secret])
    request = CredentialPut(name="anthropic", kind="api_key", value=VALUE)
    assert VALUE.decode() not in repr(request) + str(request)
    store.close()
    assert VALUE not in store_file(paths).read_bytes()
    assert open_store().secret_for("anthropic").value == VALUE


def test_the_key_file_is_made_0400_outside_the_data_and_a_readable_one_is_refused(open_store, paths):
    data_dir, key_file = paths
    open_store().close()
    assert key_file.stat().st_mode & 0o777 == 0o400
    assert len(key_file.read_bytes()) == crypto.KEY_BYTES
    os.chmod(key_file, 0o440)
    with pytest.raises(StoreRefused, match=f"{key_file} has mode 0440"):
        open_store()


def test_a_missing_key_file_is_refused_for_an_existing_store_and_not_made_again(open_store, paths):
    _, key_file = paths
    open_store().put("a", "api_key", VALUE, "", 0.0)
    key_file.unlink()
    with pytest.raises(StoreRefused, match="does not exist.*restore the file"):
        open_store()
    assert not key_file.exists()


def test_a_key_file_that_cannot_be_made_is_refused_naming_it(open_store, tmp_path):
    (tmp_path / "not-a-directory").write_text("")
    with pytest.raises(StoreRefused, match="Not a directory: .*not-a-directory"):
        open_store(tmp_path / "not-a-directory" / "master.key")


def test_a_wrong_master_key_is_refused_and_nothing_is_written(open_store, paths, tmp_path):
    store = open_store()
    store.put("a", "api_key", VALUE, "", 0.0)
    store.close()
    other_key = tmp_path / "other" / "master.key"
    KeyFile(str(other_key)).create()  # a valid key, not this store's
    before = listing(store_file(paths).parent), listing(paths[1].parent)
    with pytest.raises(
        StoreRefused, match=f"{store_file(paths)}: the master key in {other_key} does not open"
    ):
        CredentialStore.open(str(paths[0]), KeyFile(str(other_key)))
    assert (listing(store_file(paths).parent), listing(paths[1].parent)) == before


def swap_blobs(path: Path, column: str, into: tuple[str, int], source: tuple[str, int]) -> None:
    db = sqlite3.connect(path)
    with db:
        (blob,) = db.execute(
            f"SELECT {column} FROM versions v JOIN secrets s ON s.id = v.secret_id"
            " WHERE s.name = ? AND v.version = ?",
            source,
        ).fetchone()
        db.execute(
            f"UPDATE versions SET {column} = ? WHERE version = ?"
            " AND secret_id = (SELECT id FROM secrets WHERE name = ?)",
            (blob, into[1], into[0]),
        )
    db.close()


@pytest.mark.parametrize("columns", [("sealed_value",), ("wrapped_key",), ("wrapped_key", "sealed_value")])
def test_a_blob_moved_to_another_row_does_not_decrypt(open_store, paths, columns):
    store = open_store()
    store.put("a", "api_key", VALUE, "", 0.0)
    store.put("b", "api_key", b"another-value", "", 0.0)
    store.close()
    for column in columns:
        swap_blobs(store_file(paths), column, into=("a", 1), source=("b", 1))
    with pytest.raises(StoreRefused, match="version 1 of credential 'a' does not decrypt"):
        open_store()


def test_a_blob_moved_to_another_version_of_the_same_secret_does_not_decrypt(open_store, paths, clock):
    store = open_store()
    store.put("a", "api_key", VALUE, "", 0.0)
    store.rotate("a", b"second-value", None, 3600.0)
    store.close()
    for column in ("wrapped_key", "sealed_value"):
        swap_blobs(store_file(paths), column, into=("a", 2), source=("a", 1))
    with pytest.raises(StoreRefused, match="version 2 of credential 'a' does not decrypt"):
        open_store()


def made_store(open_store, paths) -> Path:
    store = open_store()
    for n in range(20):
        store.put(f"secret-{n}", "api_key", VALUE + str(n).encode(), "", 0.0)
    store.close()
    return store_file(paths)


def flip_in_a_sealed_value(data: bytearray, path: Path) -> None:
    db = sqlite3.connect(f"{path.as_uri()}?mode=ro&immutable=1", uri=True)
    (sealed,) = db.execute("SELECT sealed_value FROM versions LIMIT 1").fetchone()
    db.close()
    at = bytes(data).index(sealed) + crypto.NONCE_BYTES + 3
    data[at] ^= 0x04


@pytest.mark.parametrize(
    "damage, cause",
    [
        ("flip a bit in a sealed value", "does not decrypt"),
        ("flip a bit in the header", "cannot open the store|corrupt|not a database"),
        ("cut the file in half", "corrupt|malformed"),
        ("cut it to nothing", "schema version 0.*empty or cut"),
    ],
)
def test_a_damaged_store_is_refused_naming_the_file_and_left_untouched(open_store, paths, damage, cause):
    path = made_store(open_store, paths)
    data = bytearray(path.read_bytes())
    if damage == "flip a bit in a sealed value":
        flip_in_a_sealed_value(data, path)
    elif damage == "flip a bit in the header":
        data[3] ^= 0x20  # "SQLite format 3"
    elif damage == "cut the file in half":
        data = data[: len(data) // 2]
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    before = listing(path.parent), listing(paths[1].parent)
    with pytest.raises(StoreRefused, match=f"^{path}: ") as refused:
        open_store()
    assert any(word in str(refused.value) for word in cause.replace(".*", "|").split("|")), refused.value
    assert (listing(path.parent), listing(paths[1].parent)) == before


def test_rotating_keeps_the_previous_version_for_its_grace_period_then_erases_it(open_store, clock, paths):
    store = open_store()
    store.put("a", "bearer_token", VALUE, "", 0.0)
    created = clock.now
    clock.now += 10
    info = store.rotate("a", b"second-value", None, 60.0)
    assert info.version == 2 and info.rotated_at == clock.now and info.created_at == created
    assert [(v.version, v.retired_at, v.erase_at) for v in info.versions] == [
        (2, 0.0, 0.0),
        (1, clock.now, clock.now + 60.0),
    ]
    assert store.secret_for("a") == Secret(name="a", kind="bearer_token", version=2, value=b"second-value")
    clock.now += 59
    assert store.erase_retired() == []
    clock.now += 1
    assert store.erase_retired() == [("a", 1)]
    assert [v.version for v in store.describe("a").versions] == [2]
    store.close()
    db = sqlite3.connect(store_file(paths))
    assert db.execute("SELECT version FROM versions").fetchall() == [(2,)]
    db.close()


def test_an_expired_secret_is_never_handed_out_and_announced_once(open_store, clock):
    store = open_store()
    store.put("a", "api_key", VALUE, "", clock.now + 100)
    store.put("b", "api_key", VALUE, "", 0.0)
    assert store.secret_for("a").value == VALUE
    assert store.announce_expired() == []
    clock.now += 100
    with pytest.raises(SecretExpired, match="credential 'a' expired") as expired:
        store.secret_for("a")
    assert expired.value.reason == "expired" and VALUE.decode() not in str(expired.value)
    assert store.describe("a").expired and not store.describe("b").expired
    info = store.describe("a")
    assert store.announce_expired() == [(info.id, "a", clock.now)]
    assert store.announce_expired() == []
    assert store.secret_for("b").value == VALUE
    store.rotate("a", b"renewed", clock.now + 50, 0.0)  # a new expiry is announced again when it comes
    assert store.secret_for("a").value == b"renewed"
    clock.now += 50
    assert [name for _, name, _ in store.announce_expired()] == ["a"]


def blob_of(path: Path, name: str, version: int) -> bytes:
    db = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    (wrapped,) = db.execute(
        "SELECT wrapped_key FROM versions v JOIN secrets s ON s.id = v.secret_id"
        " WHERE s.name = ? AND v.version = ?",
        (name, version),
    ).fetchone()
    db.close()
    return wrapped


def test_an_erased_version_leaves_no_trace_in_the_file(open_store, paths, clock):
    store = open_store()
    store.put("a", "api_key", VALUE, "", 0.0)
    store.put("b", "api_key", VALUE, "", 0.0)
    store.rotate("a", b"second-value", None, 0.0)
    erased = [blob_of(store_file(paths), "a", 1), blob_of(store_file(paths), "b", 1)]
    assert store.erase_retired() == [("a", 1)]
    store.delete("b")
    store.close()  # the WAL goes into the file
    data = store_file(paths).read_bytes()
    assert [blob in data for blob in erased] == [False, False]


def test_missing_names_and_taken_names(open_store):
    store = open_store()
    with pytest.raises(SecretNotFound, match="no credential named 'nope'"):
        store.secret_for("nope")
    for action in (
        lambda: store.describe("nope"),
        lambda: store.delete("nope"),
        lambda: store.rotate("nope", b"x", None, 0),
    ):
        with pytest.raises(SecretNotFound, match="no credential named 'nope'"):
            action()
    store.put("a", "api_key", VALUE, "", 0.0)
    with pytest.raises(CredentialExists, match="rotate it") as taken:
        store.put("a", "api_key", b"other", "", 0.0)
    assert taken.value.name == "a"
    assert store.secret_for("a").value == VALUE


def test_delete_erases_every_version(open_store, paths):
    store = open_store()
    store.put("a", "api_key", VALUE, "", 0.0)
    store.rotate("a", b"second-value", None, 3600.0)
    store.delete("a")
    with pytest.raises(SecretNotFound):
        store.secret_for("a")
    store.close()
    db = sqlite3.connect(store_file(paths))
    assert db.execute("SELECT COUNT(*) FROM versions").fetchone() == (0,)
    db.close()


def test_uses_are_written_in_batches_and_shown_at_once(open_store, clock):
    store = open_store()
    store.put("a", "api_key", VALUE, "", 0.0)
    clock.now += 5
    store.mark_used("a")
    assert store.describe("a").last_used_at == clock.now
    store.close()  # flushes
    assert open_store().describe("a").last_used_at == clock.now


def test_list_pages_oldest_first(open_store):
    store = open_store()
    for name in ("c", "a", "b"):
        store.put(name, "api_key", VALUE, "", 0.0)
    first, cursor = store.list(2, 0)
    rest, end = store.list(2, cursor)
    assert [i.name for i in first] == ["c", "a"] and [i.name for i in rest] == ["b"] and end == 0


# -- master key rotation ---------------------------------------------------------------------------


def test_rotate_master_rewraps_every_data_key_and_replaces_the_key_file(open_store, paths):
    _, key_file = paths
    store = open_store()
    store.put("a", "api_key", VALUE, "", 0.0)
    store.rotate("a", b"second-value", None, 3600.0)
    store.put("b", "basic", b"user:pass", "", 0.0)
    old_key = key_file.read_bytes()
    assert store.rotate_master() == 3
    assert store.secret_for("a").value == b"second-value"
    store.close()
    new_key = key_file.read_bytes()
    assert new_key != old_key and key_file.stat().st_mode & 0o777 == 0o400
    assert not key_file.with_name(key_file.name + ".next").exists()
    reopened = open_store()
    assert (reopened.secret_for("a").value, reopened.secret_for("b").value) == (b"second-value", b"user:pass")
    reopened.close()
    old_file = key_file.with_name("old.key")
    old_file.write_bytes(old_key)
    os.chmod(old_file, 0o400)
    with pytest.raises(StoreRefused, match="does not open the store"):
        open_store(old_file)


class Crash(BaseException):
    """Stands for a kill -9 at one point of a rotation: nothing after it runs."""


class CrashingKeyFile(KeyFile):
    def __init__(self, path: str, at: str):
        super().__init__(path)
        self.at = at

    def begin_rotation(self, current):
        staged = super().begin_rotation(current)
        if self.at == "before the commit":
            raise Crash
        return staged

    def abort_rotation(self):
        if self.at != "before the commit":
            super().abort_rotation()

    def finish_rotation(self):
        raise Crash  # after the commit, before the file is moved into place


@pytest.mark.parametrize("at", ["before the commit", "after the commit"])
def test_a_rotation_cut_short_at_any_step_leaves_every_secret_readable(open_store, paths, at):
    _, key_file = paths
    store = open_store()
    store.put("a", "api_key", VALUE, "", 0.0)
    store.put("b", "api_key", b"second-value", "", 0.0)
    store.close()
    old_key = key_file.read_bytes()
    crashing = open_store(source=CrashingKeyFile(str(key_file), at))
    with pytest.raises(Crash):
        crashing.rotate_master()
    staged = key_file.with_name(key_file.name + ".next")
    assert staged.exists()  # the crash left the new key beside the current one
    crashing._db.close()  # the process is gone (no flush, no clean close)
    reopened = open_store()
    assert (reopened.secret_for("a").value, reopened.secret_for("b").value) == (VALUE, b"second-value")
    assert not staged.exists()
    assert (key_file.read_bytes() == old_key) is (at == "before the commit")


# -- passphrase -------------------------------------------------------------------------------------


@pytest.fixture
def cheap_scrypt(monkeypatch):
    monkeypatch.setattr(master, "SCRYPT_N", 2**10)


def passphrase_file(tmp_path: Path, text: bytes) -> Path:
    path = tmp_path / "secrets" / "passphrase"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(text)
    os.chmod(path, 0o600)
    return path


def test_a_passphrase_opens_the_store_and_a_wrong_one_is_refused_with_nothing_written(
    open_store, paths, tmp_path, cheap_scrypt
):
    phrase = passphrase_file(tmp_path, b"correct horse battery staple\n")
    store = open_store(source=Passphrase.from_file(str(phrase)))
    store.put("a", "api_key", VALUE, "", 0.0)
    store.close()
    assert open_store(source=Passphrase.from_file(str(phrase))).secret_for("a").value == VALUE
    phrase.write_bytes(b"wrong horse")
    before = listing(store_file(paths).parent)
    with pytest.raises(StoreRefused, match=f"passphrase from passphrase file {phrase} does not open"):
        open_store(source=Passphrase.from_file(str(phrase)))
    assert listing(store_file(paths).parent) == before
    with pytest.raises(StoreRefused, match="made with a passphrase, not a master key file"):
        open_store()


def test_rotating_the_master_with_a_passphrase_reads_it_again(open_store, tmp_path, cheap_scrypt):
    phrase = passphrase_file(tmp_path, b"first passphrase")
    store = open_store(source=Passphrase.from_file(str(phrase)))
    store.put("a", "api_key", VALUE, "", 0.0)
    phrase.write_bytes(b"second passphrase")
    assert store.rotate_master() == 1
    store.close()
    assert open_store(source=Passphrase.from_file(str(phrase))).secret_for("a").value == VALUE
    phrase.write_bytes(b"first passphrase")
    with pytest.raises(StoreRefused, match="does not open"):
        open_store(source=Passphrase.from_file(str(phrase)))


def test_a_passphrase_from_the_environment_and_an_empty_one(open_store, monkeypatch, cheap_scrypt):
    monkeypatch.setenv("TEST_BAAAHT_PASSPHRASE", "from the environment")
    open_store(source=Passphrase.from_env("TEST_BAAAHT_PASSPHRASE")).put("a", "api_key", VALUE, "", 0.0)
    monkeypatch.setenv("TEST_BAAAHT_PASSPHRASE", "")
    with pytest.raises(StoreRefused, match="environment variable TEST_BAAAHT_PASSPHRASE is empty"):
        open_store(source=Passphrase.from_env("TEST_BAAAHT_PASSPHRASE"))


def test_the_default_scrypt_cost_is_memory_hard():
    assert 128 * master.SCRYPT_N * master.SCRYPT_R >= 64 * 1024 * 1024


def test_a_write_whose_commit_fails_with_its_transaction_left_open_does_not_stop_the_next(open_store):
    """Left open (SQLite may, after SQLITE_FULL or SQLITE_IOERR), every later write failed: BEGIN within
    a transaction."""
    from tests.sqlite_faults import FailingCommit

    store = open_store()
    db = store._db = FailingCommit(store._db)
    db.fail_next = True
    with pytest.raises(sqlite3.OperationalError, match="full"):
        store.put("lost", "api_key", VALUE, "", 0.0)
    store.put("anthropic", "api_key", VALUE, "", 0.0)
    assert [info.name for info in store.list(10, 0)[0]] == ["anthropic"]
