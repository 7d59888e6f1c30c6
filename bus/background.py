"""Background work a service declares and the runner owns: periodic tasks and long-running ones.

    @background(every=2.0)                       # every 2 s, the first run at once
    def check_engine(self) -> None: ...

    @background(every=lambda self: self.sweep_interval, marks_unhealthy=True)
    def sweep(self) -> None: ...

    @background                                  # runs until the service stops
    def follow_engine_events(self, stopping: Stopping) -> None: ...

The runner starts every task once the service is registered and started, and stops them after
the last request has finished, before it unregisters. A task that raises is logged and run again
after a backoff that doubles with each failure in a row (capped); a long-running task that returns
on its own is run again too. A task in a failure streak is named in the service's health reason
with when the streak began; with `marks_unhealthy` it also makes the service unhealthy (the broker
then routes nothing to it), for work without which the service cannot do its job.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

log = logging.getLogger("baaaht.background")

FIRST_BACKOFF = 0.5
MAX_BACKOFF = 30.0
STOP_TIMEOUT = 5.0

Interval = float | Callable[[Any], float]


def backoff(failures: int, first: float, most: float) -> float:
    """The pause after the `failures`-th failure in a row: doubling from `first`, at most `most`."""
    return min(most, first * 2 ** (failures - 1))


@dataclass(frozen=True)
class BackgroundSpec:
    """What `@background` declared on a method; `every` is None for a long-running task."""

    method: str
    every: Interval | None
    marks_unhealthy: bool


def background(fn: Callable | None = None, *, every: Interval | None = None, marks_unhealthy: bool = False):
    """Declare a method as background work: periodic with `every` (seconds, or a function of the
    service giving them), else long-running (it is passed a `Stopping` and returns once it is set)."""

    def mark(f: Callable) -> Callable:
        f.__baaaht_background__ = BackgroundSpec(f.__name__, every, marks_unhealthy)
        return f

    return mark(fn) if fn is not None else mark


class Closable(Protocol):
    def close(self) -> None: ...


class Stopping:
    """Set when the runner stops background work. A long-running task waits on it, or hands it what
    it blocks on (`with stopping.closing(stream):`) so that stopping closes that and unblocks it."""

    def __init__(self):
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._open: set[Closable] = set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float) -> bool:
        return self._event.wait(timeout)

    def set(self) -> None:
        with self._lock:
            self._event.set()
            blocking = list(self._open)
        for resource in blocking:
            resource.close()

    @contextlib.contextmanager
    def closing(self, resource: Closable) -> Iterator[Closable]:
        """While inside, stopping closes `resource`; on the way out it is closed in any case."""
        with self._lock:
            stopped = self._event.is_set()
            if not stopped:
                self._open.add(resource)
        if stopped:
            resource.close()
        try:
            yield resource
        finally:
            with self._lock:
                self._open.discard(resource)
            resource.close()

    def waking(self, event: threading.Event) -> contextlib.AbstractContextManager:
        """While inside, stopping also sets `event`: a task sleeping on its own wake-up event (set when
        there is work) wakes to stop at once, instead of at the end of its sleep."""
        return self.closing(_Setting(event))


@dataclass(frozen=True)
class _Setting:
    """An event as a Closable: closing it sets it."""

    event: threading.Event

    def close(self) -> None:
        self.event.set()


@dataclass(frozen=True)
class Task:
    """One piece of background work, bound: `run()` for a periodic task, `run(stopping)` else."""

    name: str
    run: Callable[..., None]
    every: float | None = None
    marks_unhealthy: bool = False

    @classmethod
    def of(cls, service: Any, spec: BackgroundSpec) -> "Task":
        every = spec.every(service) if callable(spec.every) else spec.every
        return cls(spec.method, getattr(service, spec.method), every, spec.marks_unhealthy)


@dataclass
class TaskStatus:
    name: str
    marks_unhealthy: bool
    failures: int = 0  # in a row
    failing_since: float = 0.0  # wall-clock time of the first failure in the row
    last_error: str = ""
    running_since: float | None = None  # monotonic; None between runs

    def describe(self) -> str:
        since = datetime.datetime.fromtimestamp(self.failing_since, datetime.timezone.utc)
        return (
            f"background task {self.name} failing since {since.strftime('%Y-%m-%dT%H:%M:%SZ')}"
            f" ({self.failures} failure{'s' if self.failures != 1 else ''} in a row): {self.last_error}"
        )


class Background:
    """Runs tasks, one thread each, from `start()` until `stop()`."""

    def __init__(
        self,
        tasks: list[Task],
        *,
        first_backoff: float = FIRST_BACKOFF,
        max_backoff: float = MAX_BACKOFF,
        wall_clock: Callable[[], float] = time.time,
    ):
        self.tasks = tasks
        self.first_backoff = first_backoff
        self.max_backoff = max_backoff
        # A long-running task that has stayed up this long after a failure has recovered.
        self.stable_after = max_backoff
        self.wall_clock = wall_clock
        self.stopping = Stopping()
        self._lock = threading.Lock()
        self._status = {task.name: TaskStatus(task.name, task.marks_unhealthy) for task in tasks}
        self._threads: list[threading.Thread] = []

    @classmethod
    def of_service(cls, service: Any, *extra: Task, **settings: Any) -> "Background":
        """The background work `service` declared with `@background`, plus `extra` tasks."""
        declared = [Task.of(service, spec) for spec in type(service).background_tasks()]
        return cls([*declared, *extra], **settings)

    def start(self) -> None:
        for task in self.tasks:
            thread = threading.Thread(target=self._keep_running, args=(task,), name=task.name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        self.stopping.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.warning("background task did not stop in time", extra={"task": thread.name})

    def failing(self) -> list[TaskStatus]:
        """The tasks in a failure streak now."""
        now = time.monotonic()
        with self._lock:
            for status in self._status.values():
                if status.running_since is not None and now - status.running_since >= self.stable_after:
                    status.failures = 0
            return [TaskStatus(**vars(status)) for status in self._status.values() if status.failures]

    def health(self) -> tuple[bool, str]:
        """(False unless no failing task marks the service unhealthy, what is failing)."""
        failing = self.failing()
        return (
            not any(status.marks_unhealthy for status in failing),
            "; ".join(status.describe() for status in failing),
        )

    def _keep_running(self, task: Task) -> None:
        status = self._status[task.name]
        delay = 0.0
        while not self.stopping.wait(delay):
            started = time.monotonic()
            with self._lock:
                status.running_since = started
            try:
                if task.every is None:
                    task.run(self.stopping)
                else:
                    task.run()
            except Exception as exc:
                if self.stopping.is_set():
                    return  # what it was blocked on was closed to stop it
                log.exception("background task failed", extra={"task": task.name})
                delay = self._failed(status, exc, time.monotonic() - started)
                continue
            with self._lock:
                status.running_since = None
                status.failures = 0
            delay = self.first_backoff if task.every is None else task.every

    def _failed(self, status: TaskStatus, exc: Exception, ran_for: float) -> float:
        """Record the failure; the pause before the next run."""
        with self._lock:
            status.running_since = None
            if ran_for >= self.stable_after:
                status.failures = 0  # it had recovered: a new streak
            if not status.failures:
                status.failing_since = self.wall_clock()
            status.failures += 1
            status.last_error = f"{type(exc).__name__}: {exc}"
            return backoff(status.failures, self.first_backoff, self.max_backoff)
