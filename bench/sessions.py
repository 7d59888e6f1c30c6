"""Session benchmark: `session.send_message` round trips through the bus, each acknowledged only
after its SQLite commit (WAL, synchronous=FULL; concurrent writers share one commit and one fsync).

Cases: 1 writer, 16 concurrent writers on 16 sessions, and 16 on one session (one order for all);
and as the ceiling of the bus and the service's RPC path, 16 callers of `session.get` (a read: no
write, no commit), so a figure shows how much of a round trip the write path itself costs.
Every writer is a thread with its own bus connection; broker and session service are their own
processes. In the same run, the same disk's raw SQLite commit rate (one row per commit) with
synchronous=FULL and NORMAL is measured in process: 16 writers should acknowledge at least as many
messages per second as raw FULL commits, since a group commit pays one fsync for many messages.
Prints a table, the load average around the run (the machine is shared: compare within one run),
and writes bench/results/sessions.json. BENCH_FSYNC_DELAY_US=N runs it as on a disk whose flush takes N us
more (bench/slow_disk.py; make bench-slow-disk), into bench/results/sessions-fsync-Nus.json.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import statistics
import tempfile
import threading
import time
from pathlib import Path

import slow_disk  # bench/slow_disk.py, beside this script
from machine import load_before, save  # bench/machine.py, beside this script

from baaaht.bus.testing import Host
from baaaht.schemas.sessions import SessionCreate, SessionGet, SessionSendMessage

SECONDS = float(os.environ.get("BENCH_SECONDS", "3"))
WARMUP = 0.5
CONTENT = "x" * 301  # the bus benchmark's body size


def send(session_id: str) -> SessionSendMessage:
    return SessionSendMessage(session_id=session_id, content=CONTENT)


def read(session_id: str) -> SessionGet:
    return SessionGet(session_id=session_id)


def caller(host: Host, request, start: threading.Barrier, stop_at: list[float], latencies: list[float]):
    client = host.client(timeout=30)
    client.call(request)  # connect before timing
    start.wait(30)
    measure_from = time.perf_counter() + WARMUP
    while True:
        began = time.perf_counter()
        client.call(request)
        now = time.perf_counter()
        if now >= stop_at[0]:
            return
        if began >= measure_from:
            latencies.append(now - began)


def call_rate(host: Host, session_ids: list[str], make=send) -> dict:
    start = threading.Barrier(len(session_ids) + 1)
    stop_at = [float("inf")]
    per_writer: list[list[float]] = [[] for _ in session_ids]
    threads = [
        threading.Thread(target=caller, args=(host, make(session_id), start, stop_at, latencies))
        for session_id, latencies in zip(session_ids, per_writer, strict=True)
    ]
    for thread in threads:
        thread.start()
    start.wait(30)
    stop_at[0] = time.perf_counter() + WARMUP + SECONDS
    for thread in threads:
        thread.join(SECONDS + 60)
    latencies = sorted(value for values in per_writer for value in values)
    return {
        "writers": len(session_ids),
        "sessions": len(set(session_ids)),
        "round_trips_per_s": len(latencies) / SECONDS,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
    }


def raw_commit_rate(directory: str, synchronous: str) -> float:
    """Single-row commits per second straight into SQLite, no bus, no service."""
    path = os.path.join(directory, f"raw-{synchronous}.db")
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute(f"PRAGMA synchronous = {synchronous}")
    db.execute("CREATE TABLE messages (seq INTEGER PRIMARY KEY, body TEXT)")
    done, stop_at = 0, time.perf_counter() + SECONDS
    while time.perf_counter() < stop_at:
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO messages (body) VALUES (?)", (CONTENT,))
        db.execute("COMMIT")
        done += 1
    db.close()
    return done / SECONDS


def main() -> None:
    machine = load_before(fsync_delay=True)
    work = Path(tempfile.mkdtemp(prefix="bench-sessions-"))
    host = Host(work, {"log": {"level": "warn"}, "session": {"max_sessions": 100}})
    rows = {}
    try:
        host.start_broker()
        host.start_service("baaaht.services.sessions", "session")
        client = host.client(timeout=30)
        own = [client.call(SessionCreate(owner="bench", name=f"writer {n}")).id for n in range(16)]
        rows["writers_1"] = call_rate(host, own[:1])
        rows["writers_16"] = call_rate(host, own)
        rows["writers_16_one_session"] = call_rate(host, own[:1] * 16)
        rows["readers_16"] = call_rate(host, own, make=read)
        raw = {mode: raw_commit_rate(str(work), mode) for mode in ("FULL", "NORMAL")}
    finally:
        host.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(slow_disk.heading())
    print(f"{'case':<24} {'round trips/s':>14} {'p50 ms':>8} {'p99 ms':>8}")
    for name, row in rows.items():
        print(f"{name:<24} {row['round_trips_per_s']:>14.0f} {row['p50_ms']:>8.2f} {row['p99_ms']:>8.2f}")
    for mode, rate in raw.items():
        print(f"raw SQLite commits/s, WAL synchronous={mode}: {rate:.0f}")
    ratio = rows["writers_16"]["round_trips_per_s"] / raw["FULL"]
    ceiling = rows["writers_16"]["round_trips_per_s"] / rows["readers_16"]["round_trips_per_s"]
    print(f"16 writers acknowledge {ratio:.2f}x the raw FULL commit rate")
    print(f"16 writers acknowledge {ceiling:.2f}x the rate of 16 readers of the same service (no commit)")
    save(
        "sessions",
        machine,
        {
            "seconds": SECONDS,
            "rows": rows,
            "raw_sqlite_commits_per_s": raw,
            "writers_16_vs_raw_full": ratio,
            "writers_16_vs_readers_16": ceiling,
        },
    )


if __name__ == "__main__":
    main()
