"""One host per data directory: an exclusive flock on `<data_dir>/host.lock`.

Two hosts on one data directory would interleave writes to the audit chain and share one
install id, so the launcher takes the lock before anything else and keeps it for the host's
life; supervisord inherits the descriptor, so the lock lasts while either of them runs (the
kernel drops it when the last holder exits, however it exits). The file names its holder
(pid, run directory, start time) so that a refused host can say who is in the way.
"""

from __future__ import annotations

import fcntl
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import msgspec

LOCK_NAME = "host.lock"


class Holder(msgspec.Struct, kw_only=True):
    pid: int
    run_dir: str
    started_at: float

    def describe(self) -> str:
        started = datetime.fromtimestamp(self.started_at, timezone.utc).isoformat(timespec="seconds")
        return f"pid {self.pid}, run directory {self.run_dir}, started {started.replace('+00:00', 'Z')}"


_decode_holder = msgspec.json.Decoder(Holder).decode


class DataDirInUse(RuntimeError):
    pass


class DataDirLock:
    """The held lock; `fd` is what a child must inherit to keep holding it."""

    def __init__(self, fd: int, path: Path):
        self.fd = fd
        self.path = path

    @classmethod
    def acquire(cls, data_dir: Path, run_dir: Path) -> DataDirLock:
        """Take the lock or raise DataDirInUse naming the host that holds it."""
        path = data_dir / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(fd)
            os.close(fd)
            raise DataDirInUse(f"data directory {data_dir} is in use by another host ({holder})") from None
        except BaseException:
            os.close(fd)
            raise
        holder = Holder(pid=os.getpid(), run_dir=str(run_dir), started_at=time.time())
        os.ftruncate(fd, 0)
        os.pwrite(fd, msgspec.json.encode(holder) + b"\n", 0)
        return cls(fd, path)

    def release(self) -> None:
        os.close(self.fd)


def _describe_holder(fd: int) -> str:
    text = os.pread(fd, 4096, 0)
    if not text.strip():
        return "a host that is starting and has not written its name yet"
    try:
        return _decode_holder(text).describe()
    except msgspec.DecodeError:
        return f"holder unreadable from {LOCK_NAME}: {text[:200]!r}"
