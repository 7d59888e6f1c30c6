"""Where the master key comes from: a key file outside data_dir, or a passphrase through scrypt.

The store keeps a check blob only the right master key opens (crypto.master_check); these classes
find the key that opens it, make one for a new store, and stage a new one for a rotation.

Key file rotation is crash-safe in three steps: the new key is written beside the current file as
`<file>.next` (0400, fsynced); the store's transaction re-wraps every data key and its check under
it and commits; `<file>.next` is renamed over `<file>`. A kill -9 between any two steps leaves the
store opened by the current file (before the commit: the staged key is discarded at the next start)
or by the staged one (after it: the rename is finished at the next start). A passphrase needs no
file: the new salt goes into the same transaction as the re-wrapped keys.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Callable, Literal, Protocol

from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from baaaht.services.credentials import crypto

STAGED_SUFFIX = ".next"
PARTIAL_SUFFIX = ".partial"
# scrypt cost: 128 * N * r bytes = 128 MiB of memory and about half a second, once per start.
SCRYPT_N = 2**17
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16

Kdf = dict[str, int | str]  # the scrypt parameters and salt (hex) a store was wrapped with


class MasterKeyError(Exception):
    """The master key cannot be had: the service must not start (or the rotation is refused)."""


class MasterSource(Protocol):
    source: Literal["key_file", "passphrase"]

    def create(self) -> tuple[bytes, Kdf | None]:
        """The key (and its KDF parameters) for a new, empty store."""
        ...

    def unlock(self, check: bytes, kdf: Kdf | None) -> bytes:
        """The key that opens the store's check, finishing or discarding a rotation a crash
        interrupted; MasterKeyError when none does (nothing is written then)."""
        ...

    def begin_rotation(self, current: bytes) -> tuple[bytes, Kdf | None]:
        """A new key, durable where the next start will look for it before the store commits to it."""
        ...

    def finish_rotation(self) -> None:
        """The store committed to the new key."""
        ...

    def abort_rotation(self) -> None:
        """The store did not commit: forget the new key."""
        ...


def _private(path: Path, what: str) -> None:
    """Refuse a key or passphrase file others can read or that is not a plain file."""
    info = path.lstat()
    if not stat.S_ISREG(info.st_mode):
        raise MasterKeyError(f"{what} {path} is not a regular file")
    if info.st_mode & 0o077:
        raise MasterKeyError(
            f"{what} {path} has mode {stat.S_IMODE(info.st_mode):04o}: others may read it"
            " (expected 0400 or 0600)"
        )


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class KeyFile:
    """The master key as 32 raw bytes in a 0400 file."""

    source: Literal["key_file"] = "key_file"

    def __init__(self, path: str):
        self.path = Path(path)
        self.staged = self.path.with_name(self.path.name + STAGED_SUFFIX)

    def _read(self, path: Path) -> bytes:
        _private(path, "master key file")
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            key = os.read(fd, crypto.KEY_BYTES + 1)
        finally:
            os.close(fd)
        if len(key) != crypto.KEY_BYTES:
            raise MasterKeyError(
                f"master key file {path} holds {len(key)} bytes{'+' if len(key) > crypto.KEY_BYTES else ''}"
                f" (expected exactly {crypto.KEY_BYTES})"
            )
        return key

    def _write(self, path: Path, key: bytes) -> None:
        """Write `key` to `path` as a whole or not at all (through a partial file), durably."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        partial = path.with_name(path.name + PARTIAL_SUFFIX)
        partial.unlink(missing_ok=True)
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o400)
        try:
            os.write(fd, key)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(partial, path)
        fsync_directory(path.parent)

    def create(self) -> tuple[bytes, Kdf | None]:
        """A new store: the existing key file (made on an earlier first start that got no further),
        or a new one."""
        self.staged.unlink(missing_ok=True)
        if self.path.exists():
            return self._read(self.path), None
        key = crypto.new_key()
        self._write(self.path, key)
        return key, None

    def unlock(self, check: bytes, kdf: Kdf | None) -> bytes:
        if kdf is not None:
            raise MasterKeyError("the store was made with a passphrase, not a master key file")
        current = self._read(self.path) if self.path.exists() else None
        staged = self._read(self.staged) if self.staged.exists() else None
        if current is not None and crypto.opens_check(current, check):
            if staged is not None:
                self.abort_rotation()  # a rotation stopped before its commit
            return current
        if staged is not None and crypto.opens_check(staged, check):
            self.finish_rotation()  # a rotation stopped after its commit
            return staged
        if current is None and staged is None:
            raise MasterKeyError(
                f"master key file {self.path} does not exist, and the store needs the key it was made with:"
                " restore the file (a new key would open nothing)"
            )
        raise MasterKeyError(f"the master key in {self.path} does not open the store (wrong key file?)")

    def begin_rotation(self, current: bytes) -> tuple[bytes, Kdf | None]:
        if self.staged.exists():  # an earlier rotation committed but could not move its file into place
            if self._read(self.staged) == current:
                self.finish_rotation()
            else:
                self.abort_rotation()
        key = crypto.new_key()
        self._write(self.staged, key)
        return key, None

    def finish_rotation(self) -> None:
        os.replace(self.staged, self.path)
        fsync_directory(self.path.parent)

    def abort_rotation(self) -> None:
        self.staged.unlink(missing_ok=True)
        fsync_directory(self.path.parent)


class Passphrase:
    """The master key derived from a passphrase by scrypt (memory-hard), with the store's salt.
    `read` gives the passphrase (from a file or an environment variable, never argv); it is called
    again at each rotation, so a changed passphrase file takes effect by rotating."""

    source: Literal["passphrase"] = "passphrase"

    def __init__(self, read: Callable[[], bytes], where: str):
        self.read = read
        self.where = where

    @classmethod
    def from_file(cls, path: str) -> "Passphrase":
        def read() -> bytes:
            file = Path(path)
            try:
                _private(file, "passphrase file")
                text = file.read_bytes()
            except OSError as exc:
                raise MasterKeyError(f"cannot read passphrase file {path}: {exc.strerror}") from None
            return _passphrase(text.removesuffix(b"\n").removesuffix(b"\r"), f"passphrase file {path}")

        return cls(read, f"passphrase file {path}")

    @classmethod
    def from_env(cls, variable: str) -> "Passphrase":
        def read() -> bytes:
            return _passphrase(
                os.environb.get(os.fsencode(variable), b""), f"environment variable {variable}"
            )

        return cls(read, f"environment variable {variable}")

    def derive(self, kdf: Kdf) -> bytes:
        try:
            salt = bytes.fromhex(str(kdf["salt"]))
            n, r, p = int(kdf["n"]), int(kdf["r"]), int(kdf["p"])
        except (KeyError, ValueError) as exc:
            raise MasterKeyError(f"the store's passphrase parameters are unreadable: {exc}") from None
        return Scrypt(salt=salt, length=crypto.KEY_BYTES, n=n, r=r, p=p).derive(self.read())

    def _fresh(self) -> tuple[bytes, Kdf]:
        kdf: Kdf = {"salt": os.urandom(SALT_BYTES).hex(), "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P}
        return self.derive(kdf), kdf

    def create(self) -> tuple[bytes, Kdf | None]:
        return self._fresh()

    def unlock(self, check: bytes, kdf: Kdf | None) -> bytes:
        if kdf is None:
            raise MasterKeyError("the store was made with a master key file, not a passphrase")
        key = self.derive(kdf)
        if not crypto.opens_check(key, check):
            raise MasterKeyError(
                f"the passphrase from {self.where} does not open the store (wrong passphrase?)"
            )
        return key

    def begin_rotation(self, current: bytes) -> tuple[bytes, Kdf | None]:
        return self._fresh()

    def finish_rotation(self) -> None:
        """Nothing to move: the salt went into the store's transaction."""

    def abort_rotation(self) -> None:
        """Nothing was written outside the store."""


def _passphrase(value: bytes, where: str) -> bytes:
    if not value:
        raise MasterKeyError(f"{where} is empty (expected a passphrase)")
    return value
