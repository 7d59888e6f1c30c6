"""Runner-owned background work: periodic and long-running tasks, restart with backoff, health."""

from __future__ import annotations

import itertools
import threading
import time

import pytest

from baaaht.bus.background import Background, Stopping, Task, background, backoff
from baaaht.bus.service import Service, rpc
from baaaht.bus.testing import Recorded, wait_for


def test_backoff_doubles_and_is_capped():
    assert [backoff(n, 0.5, 3.0) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]


class Flaky:
    """Fails `failures` times, then succeeds; records when each run began."""

    def __init__(self, failures: int):
        self.failures = failures
        self.runs: Recorded[float] = Recorded()
        self.succeeded = threading.Event()

    def __call__(self) -> None:
        self.runs.append(time.monotonic())
        if len(self.runs) <= self.failures:
            raise RuntimeError(f"failure {len(self.runs)}")
        self.succeeded.set()


def test_a_failing_task_is_run_again_after_a_growing_backoff_then_recovers():
    flaky = Flaky(failures=3)
    work = Background([Task("flaky", flaky, every=3600.0)], first_backoff=0.05, max_backoff=10.0)
    work.start()
    try:
        assert flaky.succeeded.wait(10)
        assert len(flaky.runs) == 4
        gaps = [later - earlier for earlier, later in itertools.pairwise(flaky.runs)]
        assert [gap >= pause - 0.005 for gap, pause in zip(gaps, [0.05, 0.1, 0.2], strict=True)] == [True] * 3
        assert work.failing() == [] and work.health() == (True, "")
    finally:
        work.stop()


def test_a_task_in_a_failure_streak_is_named_in_health_with_when_it_began():
    always = Flaky(failures=10**6)
    marking = Flaky(failures=10**6)
    work = Background(
        [
            Task("cosmetic", always, every=1.0),
            Task("vital", marking, every=1.0, marks_unhealthy=True),
        ],
        first_backoff=0.05,
        max_backoff=0.05,
        wall_clock=lambda: 1_800_000_000.0,  # 2027-01-15T08:00:00Z
    )
    work.start()
    try:
        # A run is recorded as it begins: the next run begun means the failure before it is counted.
        always.runs.wait_for_count(3, what="the cosmetic task's third run (after two failures)")
        marking.runs.wait_for_count(2, what="the vital task's second run (after a failure)")
        healthy, reason = work.health()
        assert not healthy  # the vital task's failures make the service unhealthy
        assert "background task cosmetic failing since 2027-01-15T08:00:00Z" in reason
        assert "background task vital failing since 2027-01-15T08:00:00Z" in reason
        assert "failures in a row): RuntimeError: failure" in reason
        (cosmetic,) = [s for s in work.failing() if s.name == "cosmetic"]
        assert cosmetic.failures >= 2 and cosmetic.failing_since == 1_800_000_000.0
    finally:
        work.stop()


def test_a_failing_task_that_does_not_mark_the_service_leaves_it_healthy():
    work = Background([Task("cosmetic", Flaky(failures=10**6), every=1.0)], first_backoff=10.0)
    work.start()
    try:
        wait_for(lambda: work.failing(), what="the first failure")
        healthy, reason = work.health()
        assert healthy and reason.startswith("background task cosmetic failing since ")
    finally:
        work.stop()


class Blocking:
    """A stream that blocks its reader until closed."""

    def __init__(self):
        self.closed = threading.Event()

    def __iter__(self):
        self.closed.wait(30)
        raise OSError("stream closed")

    def close(self) -> None:
        self.closed.set()


def test_a_long_running_task_is_restarted_and_stopping_closes_what_it_blocks_on():
    streams: Recorded[Blocking] = Recorded()
    ended = threading.Event()

    def follow(stopping: Stopping) -> None:
        streams.append(Blocking())
        if len(streams) == 1:
            raise RuntimeError("the feed broke")
        try:
            with stopping.closing(streams[-1]) as stream:
                for _ in stream:
                    pass
        finally:
            ended.set()

    work = Background([Task("follow", follow)], first_backoff=0.05)
    work.start()
    streams.wait_for_count(2, what="the task to be restarted")
    assert work.failing()[0].last_error == "RuntimeError: the feed broke"
    work.stop(timeout=10)
    assert streams[1].closed.is_set() and ended.is_set()
    assert work.failing()[0].failures == 1  # the error raised by closing it to stop is no failure


class Declared(Service):
    name = "declared"

    def __init__(self, interval: float):
        self.interval = interval
        self.ticks: Recorded[float] = Recorded()
        self.followed = threading.Event()

    @background(every=lambda self: self.interval)
    def tick(self) -> None:
        self.ticks.append(time.monotonic())

    @background
    def follow(self, stopping: Stopping) -> None:
        self.followed.set()
        stopping.wait(30)


def test_a_service_declares_its_background_work_with_the_decorator():
    service = Declared(interval=0.01)
    work = Background.of_service(service)
    assert sorted((t.name, t.every) for t in work.tasks) == [("follow", None), ("tick", 0.01)]
    work.start()
    try:
        service.ticks.wait_for_count(3, what="several periodic runs")
        assert service.followed.wait(10)
    finally:
        work.stop(timeout=10)


def test_a_stream_cannot_be_inline():
    with pytest.raises(TypeError, match="a stream cannot be inline"):
        rpc(stream=True, inline=True)


def test_a_lifecycle_hook_cannot_be_bus_work():
    with pytest.raises(TypeError, match="on_start is a life-cycle hook"):

        class Confused(Service):
            name = "confused"

            @background(every=1.0)
            def on_start(self) -> None: ...
