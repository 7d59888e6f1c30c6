"""A tamper-evident audit log: hash-chained JSON lines, fsync'd when appended (a batch with one fsync).

Shared by the policy service's decision log (services/policy/audit.py) and the egress proxy's call
log (services/credentials/egress/journal.py): each line is one record of the log's own msgspec type,
whose fields include `seq`, `prev` and, last, `hash`; `verify` reads only those, so every log is
checked the same way. Its `hash` is the sha256 of the line itself with the hash value
emptied, and its `prev` is the previous line's hash (the first line's is GENESIS), so editing,
removing or reordering any line breaks the chain. Removing lines from the end leaves a valid
chain, so a small head file beside the log (rewritten atomically after every append) records the
last sequence number and hash. A restarted service continues the chain from the last line.

This makes tampering evident, not impossible: someone who can rewrite the log, recompute every
hash and the head file is not caught. Ship the log elsewhere for that.
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading
from pathlib import Path

import msgspec

from baaaht.common.config import write_private_file
from baaaht.schemas.policy import AuditProblem, AuditReport

GENESIS = "0" * 64
_HASH_PREFIX = b'"hash":"'
_EMPTY_HASH_END = _HASH_PREFIX + b'"}'
_SEALED_END_LENGTH = len(_HASH_PREFIX) + 64 + 2  # "hash":"<64 hex>"}
_READ_BLOCK = 64 * 1024

_encode = msgspec.json.Encoder().encode


class ChainLink(msgspec.Struct, kw_only=True):
    """What every record carries for the chain (a log's own record type has these and more)."""

    seq: int
    prev: str = ""
    hash: str = ""


class Head(msgspec.Struct, kw_only=True):
    seq: int
    hash: str


_decode_head = msgspec.json.Decoder(Head).decode


class AuditError(Exception):
    """The log cannot be continued safely; the message says why and what to do."""


@functools.lru_cache(maxsize=None)
def _decoder(record_type: type) -> msgspec.json.Decoder:
    return msgspec.json.Decoder(record_type)


def head_path(path: Path) -> Path:
    return path.with_name(path.name + ".head")


def seal(record: msgspec.Struct) -> tuple[bytes, str]:
    """The record's line (without the newline) and its hash."""
    body = _encode(msgspec.structs.replace(record, hash=""))
    assert body.endswith(_EMPTY_HASH_END), f"{type(record).__name__}.hash must stay its last field"
    digest = hashlib.sha256(body).hexdigest()
    return body[: -len(_EMPTY_HASH_END)] + _HASH_PREFIX + digest.encode() + b'"}', digest


def decode_line(line: bytes, record_type: type = ChainLink):
    try:
        return _decoder(record_type).decode(line)
    except msgspec.DecodeError as error:
        raise ValueError(f"not a valid audit record ({error})") from None


def check_seal(line: bytes, record) -> None:
    """Raise ValueError unless the line's hash matches its content."""
    ending = _HASH_PREFIX + record.hash.encode() + b'"}'
    if len(ending) != _SEALED_END_LENGTH or not line.endswith(ending):
        raise ValueError("its hash field is not the last field of the line")
    body = line[: -len(ending)] + _EMPTY_HASH_END
    if hashlib.sha256(body).hexdigest() != record.hash:
        raise ValueError("its content does not match its hash (the line was edited)")


def unseal(line: bytes, record_type: type = ChainLink):
    """The record of a line whose hash matches its content; raises ValueError otherwise."""
    record = decode_line(line, record_type)
    check_seal(line, record)
    return record


def _last_lines(stream, end: int, count: int) -> list[bytes]:
    """Up to `count` complete lines before byte offset `end`, oldest first."""
    lines: list[bytes] = []
    position, carry = end, b""
    while position > 0 and len(lines) < count:
        start = max(0, position - _READ_BLOCK)
        stream.seek(start)
        block = stream.read(position - start) + carry
        parts = block.split(b"\n")
        carry = parts[0] if start > 0 else b""
        complete = parts[1:] if start > 0 else parts
        lines[:0] = [part for part in complete if part]
        position = start
    return lines[-count:] if count else []


def _complete_length(stream, size: int) -> int:
    """The length of the file up to and including its last newline."""
    position = size
    while position > 0:
        start = max(0, position - _READ_BLOCK)
        stream.seek(start)
        block = stream.read(position - start)
        newline = block.rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        position = start
    return 0


def _read_head(path: Path) -> Head | None:
    try:
        return _decode_head(path.read_bytes())
    except FileNotFoundError:
        return None
    except msgspec.DecodeError as error:
        raise AuditError(f"the audit head file {path} is unreadable ({error})") from None


class AuditLog:
    """Appends records under a lock; thread-safe. One writer process per log file. `verify_hint`
    is the command an operator runs to check the log, named in the errors that stop a start."""

    def __init__(self, path: str | Path, *, verify_hint: str = "baaaht-ctl audit verify"):
        self.path = Path(path)
        self.verify_hint = verify_hint
        self.head_path = head_path(self.path)
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._seq, self._hash = self._recover()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._size = os.fstat(self._fd).st_size

    def _recover(self) -> tuple[int, str]:
        """Where the chain stands: the last line's seq and hash, checked against the head file."""
        head = _read_head(self.head_path)
        if not self.path.exists():
            if head is not None and head.seq > 0:
                raise AuditError(
                    f"the audit log {self.path} is missing but {head.seq} records were written to it; "
                    f"restore it, or move {self.head_path} aside to start a new chain"
                )
            return 0, GENESIS
        with open(self.path, "rb+") as stream:
            size = stream.seek(0, os.SEEK_END)
            stream.seek(max(0, size - 1))
            if size and stream.read(1) != b"\n":
                # A line cut short by a crash was never acknowledged: drop it.
                size = _complete_length(stream, size)
                stream.truncate(size)
                os.fsync(stream.fileno())
            lines = _last_lines(stream, size, 1)
        if not lines:
            last_seq, last_hash = 0, GENESIS
        else:
            try:
                record = unseal(lines[0])
            except ValueError as error:
                raise AuditError(
                    f"the last line of the audit log {self.path} is not a valid record: {error}; "
                    f"run `{self.verify_hint}`, then move the log and its .head file aside "
                    "to start a new chain"
                ) from None
            last_seq, last_hash = record.seq, record.hash
        if head is not None and (head.seq > last_seq or (head.seq == last_seq and head.hash != last_hash)):
            raise AuditError(
                f"the audit log {self.path} ends at record {last_seq} but record {head.seq} was written: "
                f"lines were removed from its end; run `{self.verify_hint}`"
            )
        return last_seq, last_hash

    @property
    def last_seq(self) -> int:
        return self._seq

    def append(self, record):
        """Chain, write and fsync one record; returns it sealed (seq, prev and hash filled)."""
        return self.append_all([record])[0]

    def append_all(self, records: list) -> list:
        """Chain records in order and write them with one fsync and one head write (a busy writer's
        batch costs what one record does); returns them sealed. On an error none of them is written."""
        with self._lock:
            seq, digest = self._seq, self._hash
            sealed, lines = [], []
            for record in records:
                seq += 1
                record = msgspec.structs.replace(record, seq=seq, prev=digest)
                line, digest = seal(record)
                lines.append(line)
                sealed.append(msgspec.structs.replace(record, hash=digest))
            if not lines:
                return []
            data = b"\n".join(lines) + b"\n"
            try:
                pending = memoryview(data)
                while pending:
                    pending = pending[os.write(self._fd, pending) :]
                os.fsync(self._fd)
            except OSError:
                os.ftruncate(self._fd, self._size)  # no half line for the next record to follow
                raise
            self._size += len(data)
            write_private_file(self.head_path, _encode(Head(seq=seq, hash=digest)))
            self._seq, self._hash = seq, digest
        return sealed

    def close(self) -> None:
        os.close(self._fd)


def read_tail(path: str | Path, count: int, since: int, record_type: type) -> tuple[list, int]:
    """The last `count` complete records after record `since`, oldest first, and the byte offset to
    follow from. Raises ValueError for a line that is not a record (`verify` says more)."""
    with open(path, "rb") as stream:
        end = _complete_length(stream, stream.seek(0, os.SEEK_END))
        records = [decode_line(line, record_type) for line in _last_lines(stream, end, count)]
        return [record for record in records if record.seq > since], end


def read_after(path: str | Path, offset: int, record_type: type) -> tuple[list, int]:
    """The complete records written after byte `offset`, and the offset after them. Raises ValueError
    when the log is shorter than `offset` (cut, or moved aside for a new chain)."""
    with open(path, "rb") as stream:
        size = stream.seek(0, os.SEEK_END)
        if size < offset:
            raise ValueError(
                f"the log is {size} bytes, shorter than the {offset} already read: it was cut or replaced"
            )
        stream.seek(offset)
        chunk = stream.read()
    complete = chunk[: chunk.rfind(b"\n") + 1]
    return [decode_line(line, record_type) for line in complete.splitlines()], offset + len(complete)


def verify(path: str | Path, record_type: type = ChainLink) -> AuditReport:
    """Check every line's hash and its link to the previous one, and the end against the head file
    (each line decoded as `record_type`). Raises FileNotFoundError when there is no log and the head
    file says none was written."""
    path = Path(path)
    problems: list[AuditProblem] = []
    warnings: list[AuditProblem] = []
    try:
        head = _read_head(head_path(path))  # read first: the log may only grow after this
    except AuditError as error:
        head, problems = None, [AuditProblem(line=0, message=str(error))]
    # What the next line must carry; None right after a line too broken to say.
    expected_seq: int | None = 1
    expected_prev: str | None = GENESIS
    seq, last_hash, count = 0, GENESIS, 0
    try:
        stream = open(path, "rb")
    except FileNotFoundError:
        if head is None or head.seq == 0:
            raise
        problems.append(
            AuditProblem(line=0, message=f"the log is missing but {head.seq} records were written")
        )
        return AuditReport(path=str(path), ok=False, records=0, problems=problems)
    with stream:
        for number, raw in enumerate(stream, start=1):
            if not raw.endswith(b"\n"):
                warnings.append(
                    AuditProblem(line=number, message="incomplete last line (being written, or cut)")
                )
                break
            line = raw[:-1]
            try:
                record = decode_line(line, record_type)
            except ValueError as error:
                problems.append(AuditProblem(line=number, message=str(error)))
                expected_seq = expected_prev = None
                continue
            count += 1
            try:
                check_seal(line, record)
            except ValueError as error:
                problems.append(AuditProblem(line=number, message=str(error)))
            if expected_seq is not None and record.seq != expected_seq:
                problems.append(
                    AuditProblem(
                        line=number,
                        message=f"holds record {record.seq} where {expected_seq} was expected: "
                        "a line was removed or moved",
                    )
                )
            if expected_prev is not None and record.prev != expected_prev:
                problems.append(
                    AuditProblem(
                        line=number, message="does not follow the line before it (its prev hash differs)"
                    )
                )
            seq, last_hash = record.seq, record.hash
            expected_seq, expected_prev = seq + 1, last_hash
    if head is None:
        if count:
            warnings.append(
                AuditProblem(line=0, message="no head file: lines removed from the end would go unseen")
            )
    elif head.seq > seq or (head.seq == seq and head.hash != last_hash):
        problems.append(
            AuditProblem(
                line=0,
                message=f"the log ends at record {seq} but record {head.seq} was written: lines were removed",
            )
        )
    elif head.seq < seq:
        warnings.append(AuditProblem(line=0, message=f"the head file is behind (record {head.seq} of {seq})"))
    return AuditReport(
        path=str(path),
        ok=not problems,
        records=count,
        last_hash=last_hash,
        first_bad_line=min((problem.line for problem in problems if problem.line), default=0),
        problems=problems,
        warnings=warnings,
    )
