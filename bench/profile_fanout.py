"""Where an event's time goes on the fan-out path: every process sampled with py-spy.

Runs the broker, SUBSCRIBERS subscribers on baaaht's own client (stamp decoded, sequence
checked) and one publisher on baaaht's own client, each its own process as in production;
samples each with py-spy (only while it holds the GIL) while BENCH_EVENTS events go through;
prints, per process, its CPU time per event (libzmq's I/O threads included), split by the
shares of the samples at each line of baaaht's code (what the line calls counted with it) and
by the library functions called. With `nats`, the same publisher and subscriber load through
nats-server and nats-py, for the CPU per event of each process beside ours.

    python bench/profile_fanout.py [SUBSCRIBERS] [baaaht|nats]   (py-spy: the `bench` extra)
"""

from __future__ import annotations

import collections
import json
import linecache
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
OWN_FOLDERS = ("bus/", "schemas/", "services/", "host/", "ctl/")
sys.path.insert(0, str(BENCH))

import bus as bench  # noqa: E402 - bench/bus.py, for its peers

PY_SPY = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
RATE = 1000  # samples per second and thread
TOP = 12
spawn = multiprocessing.get_context("spawn")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def publisher(publish, where, go, done) -> None:
    go.get(timeout=60)
    publish(where)
    done.put("published")


class Sampled:
    """One process under py-spy."""

    def __init__(self, name: str, pid: int, out: Path | None):
        """`out`: where py-spy writes its samples; None for a process that is not Python."""
        self.name, self.pid, self.out = name, pid, out
        self.spy = out and subprocess.Popen(
            [PY_SPY, "record", "--pid", str(pid), "--rate", str(RATE)]
            + ["--format", "raw", "--output", str(out), "--nonblocking", "--gil"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.cpu_start = cpu_seconds(pid)

    def stop(self) -> None:
        self.cpu = cpu_seconds(self.pid) - self.cpu_start
        if self.spy:
            self.spy.send_signal(signal.SIGINT)
            self.spy.wait(60)

    def profile(self) -> tuple[int, collections.Counter, collections.Counter]:
        """Total samples; samples by the innermost line of baaaht's code on the stack (what it
        calls included); samples by the innermost frame outside it (library and C wrappers)."""
        total, by_line, by_leaf = 0, collections.Counter(), collections.Counter()
        for row in self.out.read_text().splitlines():
            stack, _, count = row.rpartition(" ")
            frames = stack.split(";")
            total += int(count)
            own = next((frame for frame in reversed(frames) if _is_own(frame)), frames[-1])
            by_line[own] += int(count)
            if not _is_own(frames[-1]):
                by_leaf[frames[-1]] += int(count)
        return total, by_line, by_leaf


def _is_own(frame: str) -> bool:
    """py-spy names files by their path below sys.path: baaaht's are below its package folders."""
    path = frame.rpartition(" (")[2]
    return path.startswith(OWN_FOLDERS) or path.startswith(f"{Path(__file__).name}:")


def describe(frame: str) -> str:
    """`file:line function: source`, the source when it can be read."""
    name, _, place = frame.rpartition(" (")
    path, _, line = place.rstrip(")").rpartition(":")
    source = linecache.getline(str(REPO / path), int(line)).strip() if line.isdigit() else ""
    return f"{path}:{line} {name}: {source}"[:130]


def show(title: str, counter: collections.Counter, total: int, cpu_per_event: float) -> None:
    """Shares of the sampled time, and the process's CPU time per event split by them."""
    print(f"  {title}")
    for frame, count in counter.most_common(TOP):
        print(f"    {count / total:5.1%} {count / total * cpu_per_event:6.2f} us/event  {describe(frame)}")


def start_hub(system: str, run_dir: Path) -> tuple[subprocess.Popen, object, object, object]:
    """(the hub process, where peers connect, subscriber, publish) for `baaaht` or `nats`."""
    if system == "nats":
        missing = bench.nats_missing()
        if missing:
            raise SystemExit(f"cannot profile NATS: {missing}")
        server, url = bench.start_nats(run_dir / "nats.log")
        return server, url, bench.nats_subscriber, bench.publish_nats
    config = run_dir / "config.json"
    config.write_text(
        json.dumps({"data_dir": str(run_dir), "bus": {"run_dir": str(run_dir)}, "log": {"level": "warn"}})
    )
    endpoints = {"services": f"ipc://{run_dir}/bus.sock", "events": f"ipc://{run_dir}/events.sock"}
    broker = subprocess.Popen([sys.executable, "-m", "baaaht.bus.broker", "--config", str(config)])
    time.sleep(1.0)  # bound and listening
    return broker, endpoints, bench.client_subscriber, bench.publish_client


def main() -> None:
    subscribers = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    system = sys.argv[2] if len(sys.argv) > 2 else "baaaht"
    if system not in ("baaaht", "nats"):
        raise SystemExit("usage: python bench/profile_fanout.py [SUBSCRIBERS] [baaaht|nats]")
    run_dir = Path(tempfile.mkdtemp(prefix="bh-profile-"))
    hub, where, subscriber, publish = start_hub(system, run_dir)
    results, go, done = spawn.Queue(), spawn.Queue(), spawn.Queue()
    subs = [spawn.Process(target=subscriber, args=(where, bench.EVENTS, results)) for _ in range(subscribers)]
    pub = spawn.Process(target=publisher, args=(publish, where, go, done))
    try:
        for proc in subs + [pub]:
            proc.start()
        for _ in subs:
            results.get(timeout=30)
        time.sleep(0.5)
        hub_name = "nats-server" if system == "nats" else "broker"
        sampled = [Sampled(hub_name, hub.pid, None if system == "nats" else run_dir / "hub.txt")]
        sampled.append(Sampled("publisher", pub.pid, run_dir / "publisher.txt"))
        sampled += [Sampled(f"subscriber {i}", p.pid, run_dir / f"sub{i}.txt") for i, p in enumerate(subs)]
        time.sleep(1.0)  # py-spy attached
        started = time.perf_counter()
        go.put("go")
        counts = [results.get(timeout=300) for _ in subs]
        elapsed = time.perf_counter() - started
        done.get(timeout=60)
        for one in sampled:
            one.stop()
        received = sum(count for count, _ in counts)
        print(
            f"{system}: {bench.EVENTS} events to {subscribers} subscriber(s): {received} delivered, "
            f"{received / max(span for _, span in counts):.0f}/s delivered ({elapsed:.1f} s wall); "
            f"CPU per event, all processes: {sum(one.cpu for one in sampled) / bench.EVENTS * 1e6:.1f} us"
        )
        for one in sampled:
            per_event = one.cpu / bench.EVENTS * 1e6
            print(f"\n{one.name}: {one.cpu:.2f} s CPU, {per_event:.1f} us per event")
            if one.out is not None:
                total, by_line, by_leaf = one.profile()
                if system == "baaaht":
                    show("by line of baaaht's code (with what it calls):", by_line, total, per_event)
                show("by library function (self time):", by_leaf, total, per_event)
    finally:
        for proc in subs + [pub]:
            if proc.pid is not None:
                proc.terminate()
        hub.terminate()
        hub.wait(10)
        keep = os.environ.get("PROFILE_KEEP")
        if keep:  # the raw py-spy stacks, for a flame graph or a closer look
            shutil.copytree(run_dir, keep, dirs_exist_ok=True)
        shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
