"""Scheduler benchmark, in one run: durable submit rate; enqueue-to-start latency with an idle worker;
no-op throughput through 4 workers with 4 slots each; and the same no-op work on Huey's SQLite backend.

Every submit is acknowledged only after its SQLite commit (WAL, synchronous=FULL, group commit); Huey
runs with the same durability (SqliteHuey fsync=True: synchronous=FULL, WAL), its consumer's 16 worker
threads in this process, polling every 10 ms (its default starts at 100 ms and backs off to 10 s, which
would only make its latency worse). Our workers are the worker library (baaaht.bus.worker): for the
latency one idle worker on an event loop in this process; for the throughput 4 worker processes
(bench/noop_worker.py), as worker agents are; broker and scheduler are their own processes.

Targets (issue 12): enqueue-to-start p50 under 2 ms; at least 2x Huey's throughput and a lower latency.
Prints a table, the load around the run, and writes bench/results/scheduler.json.
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

from machine import load_before, save  # bench/machine.py, beside this script

from baaaht.bus.aio import AsyncBusClient
from baaaht.bus.testing import Host, wait_for
from baaaht.bus.worker import Worker
from baaaht.schemas.tasks import TaskSubmit, TaskSucceeded, TaskWorkers

SECONDS = float(os.environ.get("BENCH_SECONDS", "3"))
LATENCY_SAMPLES = int(os.environ.get("BENCH_LATENCY_SAMPLES", "300"))
THROUGHPUT_TASKS = int(os.environ.get("BENCH_TASKS", "3000"))
SUBMITTERS = 16
WORKERS, SLOTS = 4, 4
HUEY_POLL = 0.01


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


def submit_rate(host: Host) -> dict:
    """Submits/s from 16 threads (own connections), to a queue nobody takes work from."""
    clients = [host.client(timeout=30) for _ in range(SUBMITTERS)]
    for client in clients:
        client.call(TaskSubmit(queue="bench-idle", task_type="noop"))  # connected before timing
    counts = [0] * SUBMITTERS
    stop_at = time.perf_counter() + SECONDS

    def submit(n: int) -> None:
        while time.perf_counter() < stop_at:
            clients[n].call(TaskSubmit(queue="bench-idle", task_type="noop"))
            counts[n] += 1

    in_threads(SUBMITTERS, submit)
    return {"submitters": SUBMITTERS, "submits_per_s": sum(counts) / SECONDS}


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


def our_throughput(host: Host) -> dict:
    """THROUGHPUT_TASKS no-op tasks submitted by 16 threads, run by 4 worker processes x 4 slots: submit
    to done."""
    workers = start_worker_processes(host, "bench-throughput")
    clients = [host.client(timeout=30) for _ in range(SUBMITTERS)]
    watcher = host.client(timeout=30)
    try:
        with watcher.subscribe(["task.succeeded"]) as events:
            began = time.perf_counter()

            def submit(n: int) -> None:
                for _ in range(THROUGHPUT_TASKS // SUBMITTERS):
                    clients[n].call(TaskSubmit(queue="bench-throughput", task_type="noop"))

            submitting = threading.Thread(target=in_threads, args=(SUBMITTERS, submit))
            submitting.start()
            total = (THROUGHPUT_TASKS // SUBMITTERS) * SUBMITTERS
            seen = 0
            while seen < total:
                delivery = events.next(timeout=30)
                if delivery is None:
                    raise RuntimeError(f"only {seen} of {total} tasks finished")
                if isinstance(delivery.event, TaskSucceeded) and delivery.event.queue == "bench-throughput":
                    seen += 1
            elapsed = time.perf_counter() - began
            submitting.join(30)
    finally:
        for name in workers:
            host.kill(name, signal.SIGTERM)
    return {"tasks": total, "workers": WORKERS, "slots": SLOTS, "tasks_per_s": total / elapsed}


# -- Huey ------------------------------------------------------------------------------------------


def huey_run(directory: Path) -> dict:
    from huey import SqliteHuey

    huey = SqliteHuey(filename=str(directory / "huey.db"), fsync=True, journal_mode="wal")
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

    consumer = huey.create_consumer(
        workers=WORKERS * SLOTS,
        worker_type="thread",
        initial_delay=HUEY_POLL,
        max_delay=HUEY_POLL,
        periodic=False,
    )
    consumer.start()
    try:
        samples = []
        for n in range(LATENCY_SAMPLES + 20):
            begun.clear()
            sent = time.perf_counter()
            latency_probe()
            if not begun.wait(10):
                raise RuntimeError("a Huey task did not start within 10 s")
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
    return {"latency": ms(samples), "tasks_per_s": total / elapsed, "enqueues_per_s": enqueue_rate}


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
    machine = load_before()
    work = Path(tempfile.mkdtemp(prefix="bench-scheduler-"))
    host = Host(work, {"log": {"level": "warn"}})
    try:
        host.start_broker()
        host.start_service("baaaht.services.scheduler", "scheduler", service="task")
        ours = {
            "submit": submit_rate(host),
            "latency": our_latency(host),
            "throughput": our_throughput(host),
        }
    finally:
        host.stop()
    try:
        huey = huey_run(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = [
        ("durable submits/s (16 threads)", ours["submit"]["submits_per_s"], huey["enqueues_per_s"], "0f"),
        ("enqueue-to-start p50 ms", ours["latency"]["p50_ms"], huey["latency"]["p50_ms"], "2f"),
        ("enqueue-to-start p99 ms", ours["latency"]["p99_ms"], huey["latency"]["p99_ms"], "2f"),
        ("no-op tasks/s (4 workers x 4 slots)", ours["throughput"]["tasks_per_s"], huey["tasks_per_s"], "0f"),
    ]
    print(f"{'':<38} {'baaaht':>10} {'huey':>10}")
    for name, mine, theirs, shape in rows:
        print(f"{name:<38} {mine:>10.{shape}} {theirs:>10.{shape}}")
    ratio = ours["throughput"]["tasks_per_s"] / huey["tasks_per_s"]
    print(f"throughput {ratio:.2f}x Huey's")
    save(
        "scheduler",
        machine,
        {
            "seconds": SECONDS,
            "ours": ours,
            "huey": {**huey, "poll_interval_s": HUEY_POLL, "fsync": True, "journal_mode": "wal"},
            "throughput_vs_huey": ratio,
        },
    )


if __name__ == "__main__":
    main()
