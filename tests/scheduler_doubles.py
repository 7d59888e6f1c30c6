"""A scheduler host for tests: a broker, the scheduler process and host test workers
(tests/services/task_worker.py), with bounded waits on task events and on what the workers recorded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import msgspec

from baaaht.bus.testing import Host, next_event, wait_for
from baaaht.bus.testing.host import deep_merge
from baaaht.schemas.tasks import (
    TERMINAL,
    TaskAssignment,
    TaskGet,
    TaskInfo,
    TaskState,
    TaskSubmit,
    TaskWorkers,
)

SCHEDULER = "baaaht.services.scheduler"
WORKER = str(Path(__file__).parent / "services" / "task_worker.py")
# Short leases and graces, so that a lost worker or an unanswered cancel is noticed within a test's patience.
FAST = {"scheduler": {"lease_timeout": "1s", "cancel_grace": "2s"}}


def leases_of(work) -> Iterator[TaskAssignment]:
    """The partials of a raw task.work stream one lease at a time (a scheduler turn's leases for one
    worker come in one partial, the others in its `more`)."""
    for partial in work:
        yield partial
        yield from partial.more


def payload(value) -> bytes:
    return msgspec.msgpack.encode(value)


class Scheduler:
    def __init__(self, host: Host):
        self.host = host
        self.client = host.client(timeout=10.0)
        self.record = host.tmp_path / "worker-records.jsonl"
        self.workers = 0

    def start(self) -> None:
        self.host.start_service(SCHEDULER, "scheduler", service="task")

    def start_worker(self, queues: str, slots: int = 1, worker_id: str = "", name: str = "") -> str:
        """Start a test worker process and wait until the scheduler lists it; its process name."""
        self.workers += 1
        name = name or f"worker{self.workers}"
        worker_id = worker_id or f"w-{name}"
        argv = [WORKER, "--queues", queues, "--slots", str(slots), "--record", str(self.record)]
        self.host.spawn(name, [*argv, "--worker-id", worker_id])
        wait_for(
            lambda: any(
                w.worker_id == worker_id and w.connected for w in self.client.call(TaskWorkers()).workers
            ),
            15,
            what=f"worker {worker_id} to take work",
        )
        return name

    def submit(self, queue: str, task_type: str, value=None, **fields) -> TaskInfo:
        body = payload(value) if value is not None else b""
        return self.client.call(TaskSubmit(queue=queue, task_type=task_type, payload=body, **fields)).task

    def get(self, task_id: str) -> TaskInfo:
        return self.client.call(TaskGet(id=task_id))

    def subscribe(self, since: int | None = 0):
        return self.client.subscribe(["task."], since=since)

    def wait_state(self, task_id: str, states: set[TaskState] | TaskState = TERMINAL, timeout: float = 20.0):
        """The task once it is in one of `states`: on its events from now on (after a first look)."""
        wanted = {states} if isinstance(states, TaskState) else set(states)
        with self.subscribe(since=None) as events:
            if self.get(task_id).state in wanted:
                return self.get(task_id)

            def reached(delivery) -> bool:
                event = delivery.event
                return getattr(event, "task_id", "") == task_id and getattr(event, "state", None) in wanted

            next_event(
                events, reached, timeout, f"task {task_id} to become {sorted(s.value for s in wanted)}"
            )
        return self.get(task_id)

    def records(self, what: str = "", task_id: str = "") -> list[dict]:
        if not self.record.exists():
            return []
        lines = [json.loads(line) for line in self.record.read_text().splitlines() if line.strip()]
        return [r for r in lines if (not what or r["what"] == what) and (not task_id or r["task"] == task_id)]

    def wait_record(self, what: str, task_id: str, count: int = 1, timeout: float = 15.0) -> list[dict]:
        return wait_for(
            lambda: (found := self.records(what, task_id)) and len(found) >= count and found,
            timeout,
            what=f"{count} {what!r} record(s) of task {task_id}",
        )


def start_scheduler(make_host, overrides: dict | None = None) -> Scheduler:
    host = make_host(deep_merge(FAST, overrides or {}))
    scheduler = Scheduler(host)
    scheduler.start()
    return scheduler
