"""Scheduler benchmark, in one run: durable submit rate; enqueue-to-start latency with an idle worker;
no-op throughput through 4 workers with 4 slots each; and the same no-op work on Huey's SQLite backend.

Every submit is acknowledged only after its SQLite commit (WAL, synchronous=FULL, group commit); Huey
runs with the same durability (SqliteHuey fsync=True: synchronous=FULL, WAL), its consumer's 16 worker
threads in this process. Huey twice: tuned, polling every 10 ms (the comparison the targets are judged
on), and at its consumer's default polling (from 100 ms, x1.15 per empty poll, up to 10 s; 16 worker
threads as ours have 16 slots). Our workers are the worker library (baaaht.bus.worker): for the latency
one idle worker on an event loop in this process; for the throughput 4 worker processes
(bench/noop_worker.py), as worker agents are; broker and scheduler are their own processes.

Submits are measured two ways, each row saying which: one task per task.submit call (as Huey enqueues,
16 threads), and SUBMIT_BATCH tasks per call (task.submit's `more`, 16 threads), for submit rate and
for throughput.

Targets (issue 12): enqueue-to-start p50 under 2 ms; at least 2x Huey's throughput and a lower latency.
Prints a table, the load around the run, and writes bench/results/scheduler.json. BENCH_FSYNC_DELAY_US=N
runs it as on a disk whose flush takes N us more (bench/slow_disk.py; make bench-slow-disk), into
bench/results/scheduler-fsync-Nus.json.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import statistics
import tempfile
import threading
import time
from pathlib import Path

import msgspec
import slow_disk  # bench/slow_disk.py, beside this script
from machine import load_before, save  # bench/machine.py, beside this script

from baaaht.bus.aio import AsyncBusClient
from baaaht.bus.testing import Host, wait_for
from baaaht.bus.worker import Worker
from baaaht.schemas.tasks import TaskSubmit, TaskSucceeded, TaskWorkers

SECONDS = float(os.environ.get("BENCH_SECONDS", "3"))
LATENCY_SAMPLES = int(os.environ.get("BENCH_LATENCY_SAMPLES", "300"))
THROUGHPUT_TASKS = int(os.environ.get("BENCH_TASKS", "3000"))
SUBMITTERS = 16
SUBMIT_BATCH = int(os.environ.get("BENCH_SUBMIT_BATCH", "32"))  # tasks per task.submit call, batched rows
WORKERS, SLOTS = 4, 4
HUEY_POLL = 0.01
HUEY_DEFAULT_LATENCY_SAMPLES = 50  # its default polling sleeps up to 10 s between looks


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, int(len(ordered) * share) - 1)]


def ms(values: list[float]) -> dict:
    return {"p50_ms": statistics.median(values) * 1000, "p99_ms": percentile(values, 0.99) * 1000}


def in_threads(count: int, work) -> None:
    threads = [threading.Thread(target=work, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(SECONDS + 120)


# -- ours ------------------------------------------------------------------------------------------


def submits(batch: int) -> TaskSubmit:
    """One task.submit call of `batch` no-op tasks (the call's own and batch - 1 in its `more`)."""
    noop = TaskSubmit(queue="bench-throughput", task_type="noop")
    return msgspec.structs.replace(noop, more=[noop] * (batch - 1)) if batch > 1 else noop


def submit_rate(host: Host, batch: int) -> dict:
    """Submits/s from 16 threads (own connections), `batch` tasks a call, to a queue nobody takes work
    from."""
    clients = [host.client(timeout=30) for _ in range(SUBMITTERS)]
    request = msgspec.structs.replace(submits(batch), queue="bench-idle")
    if request.more:
        request.more = [msgspec.structs.replace(task, queue="bench-idle") for task in request.more]
    for client in clients:
        client.call(TaskSubmit(queue="bench-idle", task_type="noop"))  # connected before timing
    counts = [0] * SUBMITTERS
    stop_at = time.perf_counter() + SECONDS

    def submit(n: int) -> None:
        while time.perf_counter() < stop_at:
            clients[n].call(request)
            counts[n] += batch

    in_threads(SUBMITTERS, submit)
    return {"submitters": SUBMITTERS, "tasks_per_call": batch, "submits_per_s": sum(counts) / SECONDS}


class Workers:
    """Workers of the worker library on one event loop in a thread of this process."""

    def __init__(self, host: Host, count: int, slots: int, queue: str, handler):
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(
            target=self._run, args=(host, count, slots, queue, handler), daemon=True
        )
        self.thread.start()
        if not self.ready.wait(30):
            raise RuntimeError("the workers did not start")

    def _run(self, host, count, slots, queue, handler) -> None:
        asyncio.set_event_loop(self.loop)

        async def main():
            buses = [AsyncBusClient.for_config(host.config, timeout=30) for _ in range(count)]
            workers = [
                Worker(bus, [queue], slots, {"noop": handler}, worker_id=f"bench-{n}")
                for n, bus in enumerate(buses)
            ]
            self.tasks = [asyncio.ensure_future(worker.run()) for worker in workers]
            self.ready.set()
            try:
                await asyncio.gather(*self.tasks)
            except asyncio.CancelledError:
                pass
            for bus in buses:
                await bus.close()

        self.loop.run_until_complete(main())

    def stop(self) -> None:
        def cancel():
            for task in self.tasks:
                task.cancel()

        self.loop.call_soon_threadsafe(cancel)
        self.thread.join(30)


def our_latency(host: Host) -> dict:
    """One task at a time to one idle worker: from the submit call to the handler's start."""
    started: dict[str, float] = {}
    begun = threading.Event()

    async def handler(task):
        started["at"] = time.perf_counter()
        begun.set()

    workers = Workers(host, 1, 1, "bench-latency", handler)
    client = host.client(timeout=30)
    samples = []
    try:
        for n in range(LATENCY_SAMPLES + 20):
            begun.clear()
            sent = time.perf_counter()
            client.call(TaskSubmit(queue="bench-latency", task_type="noop"))
            if not begun.wait(10):
                raise RuntimeError("a task did not start within 10 s")
            if n >= 20:  # warm-up
                samples.append(started["at"] - sent)
    finally:
        workers.stop()
    return ms(samples)


def start_worker_processes(host: Host, queue: str) -> list[str]:
    """WORKERS processes of SLOTS slots each taking `queue`, once the scheduler lists them all."""
    names = [f"bench-worker-{n}" for n in range(WORKERS)]
    for name in names:
        host.spawn(name, [str(Path(__file__).with_name("noop_worker.py")), queue, str(SLOTS), name])
    probe = host.client(timeout=30)
    wait_for(
        lambda: {w.worker_id for w in probe.call(TaskWorkers()).workers if w.connected} >= set(names),
        30,
        what="the bench's worker processes to take work",
    )
    return names


def our_throughput(host: Host, batch: int) -> dict:
    """THROUGHPUT_TASKS no-op tasks submitted by 16 threads (`batch` tasks per call), run by the worker
    processes (4 x 4 slots): submit to done."""
    clients = [host.client(timeout=30) for _ in range(SUBMITTERS)]
    watcher = host.client(timeout=30)
    calls = THROUGHPUT_TASKS // SUBMITTERS // batch
    request = submits(batch)
    with watcher.subscribe(["task.succeeded"]) as events:
        began = time.perf_counter()

        def submit(n: int) -> None:
            for _ in range(calls):
                clients[n].call(request)

        submitting = threading.Thread(target=in_threads, args=(SUBMITTERS, submit))
        submitting.start()
        total = calls * batch * SUBMITTERS
        seen = 0
        while seen < total:
            delivery = events.next(timeout=30)
            if delivery is None:
                raise RuntimeError(f"only {seen} of {total} tasks finished")
            if isinstance(delivery.event, TaskSucceeded) and delivery.event.queue == "bench-throughput":
                seen += 1
        elapsed = time.perf_counter() - began
        submitting.join(30)
    return {
        "tasks": total,
        "tasks_per_call": batch,
        "workers": WORKERS,
        "slots": SLOTS,
        "tasks_per_s": total / elapsed,
    }


# -- Huey ------------------------------------------------------------------------------------------


def huey_run(directory: Path, tuned: bool) -> dict:
    """Huey's latency, throughput and enqueue rate; `tuned`: its consumer polls every 10 ms, else at its
    default delays."""
    from huey import SqliteHuey

    name = "tuned" if tuned else "default"
    huey = SqliteHuey(filename=str(directory / f"huey-{name}.db"), fsync=True, journal_mode="wal")
    started: dict[str, float] = {}
    begun = threading.Event()
    finished = threading.Semaphore(0)

    @huey.task()
    def latency_probe():
        started["at"] = time.perf_counter()
        begun.set()

    @huey.task()
    def noop():
        finished.release()

    polling = {"initial_delay": HUEY_POLL, "max_delay": HUEY_POLL} if tuned else {}
    consumer = huey.create_consumer(workers=WORKERS * SLOTS, worker_type="thread", periodic=False, **polling)
    consumer.start()
    try:
        samples = []
        for n in range((LATENCY_SAMPLES if tuned else HUEY_DEFAULT_LATENCY_SAMPLES) + 20):
            begun.clear()
            sent = time.perf_counter()
            latency_probe()
            if not begun.wait(10):
                raise RuntimeError("a Huey task did not start within 10 s")
            # its default consumer backs off while idle; each sample is sent after its last look
            if n >= 20:
                samples.append(started["at"] - sent)
        total = (THROUGHPUT_TASKS // SUBMITTERS) * SUBMITTERS
        began = time.perf_counter()

        def submit(_n: int) -> None:
            for _ in range(THROUGHPUT_TASKS // SUBMITTERS):
                noop()

        in_threads(SUBMITTERS, submit)
        for _ in range(total):
            if not finished.acquire(timeout=60):
                raise RuntimeError("Huey did not finish the tasks")
        elapsed = time.perf_counter() - began
        enqueue_rate = huey_enqueue_rate(huey)
    finally:
        consumer.stop(graceful=True)
    return {
        "latency": ms(samples),
        "tasks_per_s": total / elapsed,
        "enqueues_per_s": enqueue_rate,
        "poll": {"initial_delay_s": HUEY_POLL, "max_delay_s": HUEY_POLL} if tuned else "default",
    }


def huey_enqueue_rate(huey) -> float:
    """Enqueues/s from 16 threads (durable in Huey's SQLite table), of a task nobody runs soon."""
    counts = [0] * SUBMITTERS
    stop_at = time.perf_counter() + SECONDS

    @huey.task()
    def later():
        return None

    def submit(n: int) -> None:
        while time.perf_counter() < stop_at:
            later.schedule(delay=3600)
            counts[n] += 1

    in_threads(SUBMITTERS, submit)
    return sum(counts) / SECONDS


def main() -> None:
    machine = load_before(fsync_delay=True)
    work = Path(tempfile.mkdtemp(prefix="bench-scheduler-"))
    host = Host(work, {"log": {"level": "warn"}})
    try:
        host.start_broker()
        host.start_service("baaaht.services.scheduler", "scheduler", service="task")
        ours = {
            "submit": submit_rate(host, 1),
            "submit_batched": submit_rate(host, SUBMIT_BATCH),
            "latency": our_latency(host),
        }
        workers = start_worker_processes(host, "bench-throughput")
        try:
            ours["throughput"] = our_throughput(host, 1)
            ours["throughput_batched"] = our_throughput(host, SUBMIT_BATCH)
        finally:
            for name in workers:
                host.kill(name, signal.SIGTERM)
    finally:
        host.stop()
    try:
        huey = huey_run(work, tuned=True)
        huey_default = huey_run(work, tuned=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    per_call = f"{SUBMIT_BATCH} a call"
    rows = [
        (
            "durable submits/s (16 threads, 1 a call)",
            ours["submit"],
            huey,
            "submits_per_s",
            "enqueues_per_s",
            "0f",
        ),
        (
            f"durable submits/s (16 threads, {per_call})",
            ours["submit_batched"],
            None,
            "submits_per_s",
            "",
            "0f",
        ),
        ("enqueue-to-start p50 ms", ours["latency"], huey, "p50_ms", "latency.p50_ms", "2f"),
        ("enqueue-to-start p99 ms", ours["latency"], huey, "p99_ms", "latency.p99_ms", "2f"),
        ("no-op tasks/s (4x4 slots, 1 a call)", ours["throughput"], huey, "tasks_per_s", "tasks_per_s", "0f"),
        (f"no-op tasks/s (4x4 slots, {per_call})", ours["throughput_batched"], None, "tasks_per_s", "", "0f"),
    ]

    def theirs(result: dict, path: str) -> float:
        for part in path.split("."):
            result = result[part]
        return result

    print(slow_disk.heading())
    print(f"{'':<42} {'baaaht':>10} {'huey 10ms':>10} {'huey dflt':>10}")
    for name, mine, them, key, their_key, shape in rows:
        tuned = f"{theirs(them, their_key):>10.{shape}}" if them else f"{'-':>10}"
        default = f"{theirs(huey_default, their_key):>10.{shape}}" if them else f"{'-':>10}"
        print(f"{name:<42} {mine[key]:>10.{shape}} {tuned} {default}")
    ratio = ours["throughput"]["tasks_per_s"] / huey["tasks_per_s"]
    batched_ratio = ours["throughput_batched"]["tasks_per_s"] / huey["tasks_per_s"]
    latency_ratio = ours["latency"]["p50_ms"] / huey["latency"]["p50_ms"]
    print(
        f"throughput vs Huey (10 ms poll): {ratio:.2f}x with 1 task a call, {batched_ratio:.2f}x with "
        f"{per_call}; enqueue-to-start p50 {latency_ratio:.2f}x Huey's"
    )
    save(
        "scheduler",
        machine,
        {
            "seconds": SECONDS,
            "ours": ours,
            "huey": {**huey, "fsync": True, "journal_mode": "wal"},
            "huey_default_polling": {**huey_default, "fsync": True, "journal_mode": "wal"},
            "throughput_vs_huey": ratio,
            "throughput_batched_vs_huey": batched_ratio,
            "latency_p50_vs_huey": latency_ratio,
        },
    )


if __name__ == "__main__":
    main()
