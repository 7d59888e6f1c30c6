"""The audit log: chained, fsync'd lines; verify catches edits, removals and reordering."""

from __future__ import annotations

import json
import os
import threading

import pytest

from baaaht.schemas.policy import AuditRecord, Principal
from baaaht.services.policy import audit
from baaaht.services.policy.audit import GENESIS, AuditError, AuditLog


def record(n: int) -> AuditRecord:
    return AuditRecord(
        seq=0,
        time=1_700_000_000.0 + n,
        decision_id=f"d{n}",
        action="container.create",
        decision="allow" if n % 2 else "deny",
        principal=Principal(user="alice", session_id="s1"),
        image="busybox:1.36",
        rules=[] if n % 2 else ["security.root"],
        policy_version="v1",
    )


@pytest.fixture
def log_path(tmp_path):
    return tmp_path / "audit" / "policy.jsonl"


def write(log_path, count: int) -> list[AuditRecord]:
    log = AuditLog(log_path)
    try:
        return [log.append(record(n)) for n in range(1, count + 1)]
    finally:
        log.close()


def lines(log_path) -> list[bytes]:
    return log_path.read_bytes().splitlines(keepends=True)


def problems(log_path) -> list[str]:
    return [f"{p.line}: {p.message}" for p in audit.verify(log_path).problems]


def test_records_are_chained_in_order(log_path):
    written = write(log_path, 3)
    assert [r.seq for r in written] == [1, 2, 3]
    assert written[0].prev == GENESIS
    assert [r.prev for r in written[1:]] == [r.hash for r in written[:-1]]
    report = audit.verify(log_path)
    assert (report.ok, report.records, report.last_hash, report.problems) == (True, 3, written[-1].hash, [])


def test_the_log_and_its_directory_are_private(log_path):
    write(log_path, 1)
    assert os.stat(log_path).st_mode & 0o777 == 0o600
    assert os.stat(log_path.parent).st_mode & 0o777 == 0o700


def test_an_edited_line_is_caught(log_path):
    write(log_path, 3)
    content = lines(log_path)
    content[1] = content[1].replace(b'"deny"', b'"allow"')
    log_path.write_bytes(b"".join(content))
    assert problems(log_path) == ["2: its content does not match its hash (the line was edited)"]


def test_an_edited_line_with_a_recomputed_hash_breaks_the_next_link(log_path):
    write(log_path, 3)
    content = lines(log_path)
    forged = audit.decode_line(content[1].rstrip(b"\n"))
    forged.decision = "allow"
    line, _ = audit.seal(forged)
    content[1] = line + b"\n"
    log_path.write_bytes(b"".join(content))
    assert problems(log_path) == ["3: does not follow the line before it (its prev hash differs)"]


def test_a_removed_line_is_caught(log_path):
    write(log_path, 4)
    content = lines(log_path)
    del content[1]
    log_path.write_bytes(b"".join(content))
    found = problems(log_path)
    assert "2: holds record 3 where 2 was expected: a line was removed or moved" in found
    assert "2: does not follow the line before it (its prev hash differs)" in found


def test_reordered_lines_are_caught(log_path):
    write(log_path, 3)
    content = lines(log_path)
    content[1], content[2] = content[2], content[1]
    log_path.write_bytes(b"".join(content))
    assert len(problems(log_path)) >= 2


def test_lines_removed_from_the_end_are_caught_by_the_head(log_path):
    write(log_path, 3)
    log_path.write_bytes(b"".join(lines(log_path)[:2]))
    assert problems(log_path) == ["0: the log ends at record 2 but record 3 was written: lines were removed"]


def test_a_removed_first_line_is_caught(log_path):
    write(log_path, 2)
    log_path.write_bytes(b"".join(lines(log_path)[1:]))
    assert problems(log_path)[0] == "1: holds record 2 where 1 was expected: a line was removed or moved"


def test_a_garbage_line_is_reported_once(log_path):
    write(log_path, 3)
    content = lines(log_path)
    content[1] = b"not json\n"
    log_path.write_bytes(b"".join(content))
    (problem,) = problems(log_path)
    assert problem.startswith("2: not a valid audit record")


def test_a_restarted_log_continues_the_chain(log_path):
    first = write(log_path, 2)
    log = AuditLog(log_path)
    assert log.last_seq == 2
    third = log.append(record(3))
    log.close()
    assert (third.seq, third.prev) == (3, first[-1].hash)
    assert audit.verify(log_path).ok


def test_a_line_cut_by_a_crash_is_dropped_on_restart(log_path):
    write(log_path, 2)
    with open(log_path, "ab") as stream:
        stream.write(b'{"seq":3,"time":1')  # never acknowledged: no newline, no fsync'd head
    assert audit.verify(log_path).warnings[0].message.startswith("incomplete last line")
    log = AuditLog(log_path)
    log.append(record(3))
    log.close()
    report = audit.verify(log_path)
    assert (report.ok, report.records, report.warnings) == (True, 3, [])


def test_a_log_that_cannot_be_continued_is_refused_at_open(log_path):
    write(log_path, 2)
    content = lines(log_path)
    content[-1] = content[-1].replace(b"alice", b"mallory")
    log_path.write_bytes(b"".join(content))
    with pytest.raises(AuditError, match="last line of the audit log .* is not a valid record"):
        AuditLog(log_path)


def test_a_truncated_log_is_refused_at_open(log_path):
    write(log_path, 3)
    log_path.write_bytes(b"".join(lines(log_path)[:2]))
    with pytest.raises(AuditError, match="lines were removed from its end"):
        AuditLog(log_path)
    log_path.unlink()
    with pytest.raises(AuditError, match="missing"):
        AuditLog(log_path)


def test_concurrent_appends_keep_one_chain(log_path):
    log = AuditLog(log_path)
    threads = [threading.Thread(target=lambda: [log.append(record(n)) for n in range(20)]) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    log.close()
    report = audit.verify(log_path)
    assert (report.ok, report.records) == (True, 80)


def test_a_batch_is_one_chain_with_one_fsync_and_continues_after_single_appends(log_path, monkeypatch):
    log = AuditLog(log_path)
    first = log.append(record(1))
    fsyncs = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (fsyncs.append(fd), real_fsync(fd)))
    batch = log.append_all([record(n) for n in range(2, 6)])
    assert len(fsyncs) == 2  # the log's and the head file's, for four records
    assert log.append_all([]) == [] and len(fsyncs) == 2
    last = log.append(record(6))
    log.close()
    assert [r.seq for r in batch] == [2, 3, 4, 5] and batch[0].prev == first.hash
    assert last.prev == batch[-1].hash
    report = audit.verify(log_path)
    assert (report.ok, report.records, report.last_hash) == (True, 6, last.hash)


def test_a_batch_that_cannot_be_written_leaves_no_line_and_the_chain_goes_on(log_path, monkeypatch):
    log = AuditLog(log_path)
    log.append(record(1))

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        log.append_all([record(2), record(3)])
    monkeypatch.undo()
    assert log.append(record(4)).seq == 2
    log.close()
    report = audit.verify(log_path)
    assert (report.ok, report.records) == (True, 2)


def test_reading_the_tail_and_following(log_path):
    log = AuditLog(log_path)
    try:
        for n in range(1, 6):
            log.append(record(n))
        recent, offset = audit.read_tail(log_path, 2)
        assert [r.seq for r in recent] == [4, 5]
        assert [r.seq for r in audit.read_tail(log_path, 100)[0]] == [1, 2, 3, 4, 5]
        assert audit.read_tail(log_path, 0)[0] == []
        assert audit.read_after(log_path, offset) == ([], offset)
        log.append(record(6))
        with open(log_path, "ab") as stream:
            stream.write(b'{"seq":7')  # a line being written is not read yet
        new, offset = audit.read_after(log_path, offset)
        assert [r.seq for r in new] == [6]
        assert [r.seq for r in audit.read_tail(log_path, 1)[0]] == [6]
    finally:
        log.close()
    # Moved aside for a new chain: a follower is told, never left waiting at an offset that is gone.
    for moved in (log_path, audit.head_path(log_path)):
        moved.rename(moved.with_name(moved.name + ".old"))
    write(log_path, 1)
    with pytest.raises(ValueError, match="cut or replaced"):
        audit.read_after(log_path, offset)


def test_lines_are_plain_json(log_path):
    write(log_path, 1)
    (line,) = lines(log_path)
    data = json.loads(line)
    assert list(data)[-1] == "hash" and data["principal"] == {"user": "alice", "session_id": "s1"}
