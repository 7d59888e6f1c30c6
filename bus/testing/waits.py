"""Bounded waits for tests: every wait takes a timeout and fails naming what it waited for.

Prefer waiting on something that happens (`Recorded.wait_until`, an event on the bus with
`next_event`) to polling; `wait_for` polls, for states nothing announces.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Awaitable, Callable, Generic, Iterator, TypeVar

from baaaht.bus.errors import BusError

T = TypeVar("T")
DEFAULT_TIMEOUT = 10.0
SHOWN = 10  # records a timed-out wait shows


def wait_for(
    check: Callable[[], Any],
    timeout: float = DEFAULT_TIMEOUT,
    interval: float = 0.02,
    what: str = "condition",
) -> Any:
    """Poll `check` until it returns something truthy (and return that); fail after `timeout`
    seconds naming `what`. A BusError or AssertionError from `check` counts as not yet."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = check()
            if result:
                return result
        except (BusError, AssertionError) as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last_error})")


class Recorded(Generic[T]):
    """A list that threads append to and tests wait on: `wait_until` wakes at each append instead of
    polling."""

    def __init__(self):
        self._items: list[T] = []
        self._changed = threading.Condition()

    def append(self, item: T) -> None:
        with self._changed:
            self._items.append(item)
            self._changed.notify_all()

    def snapshot(self) -> list[T]:
        with self._changed:
            return list(self._items)

    def __iter__(self) -> Iterator[T]:
        return iter(self.snapshot())

    def __len__(self) -> int:
        with self._changed:
            return len(self._items)

    def __getitem__(self, index):
        with self._changed:
            return self._items[index]

    def __bool__(self) -> bool:
        return len(self) > 0

    def __eq__(self, other) -> bool:
        return self.snapshot() == (other.snapshot() if isinstance(other, Recorded) else other)

    def __repr__(self) -> str:
        return f"Recorded({self.snapshot()!r})"

    def wait_until(
        self, check: Callable[[list[T]], Any], timeout: float = DEFAULT_TIMEOUT, what: str = "a record"
    ) -> Any:
        """Block until `check(items)` is truthy (and return that), re-checking at every append;
        fail after `timeout` seconds naming `what` and showing what was recorded last. `check` is
        handed the list itself, under the lock: it reads, never keeps or changes it."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                result = check(self._items)
                if result:
                    return result
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"timed out after {timeout}s waiting for {what}; recorded {len(self._items)}"
                        f", the last: {self._items[-SHOWN:]!r}"
                    )
                self._changed.wait(remaining)

    def wait_for_count(self, count: int, timeout: float = DEFAULT_TIMEOUT, what: str = "") -> list[T]:
        """Block until at least `count` items are recorded; the items."""
        return self.wait_until(
            lambda items: list(items) if len(items) >= count else None,
            timeout,
            what or f"{count} record{'s' if count != 1 else ''}",
        )


def next_event(
    subscription,
    matches: Callable[[Any], bool] = lambda _delivery: True,
    timeout: float = DEFAULT_TIMEOUT,
    what: str = "an event",
):
    """The next delivery on a bus subscription (`BusClient.subscribe`) that `matches`; fail after
    `timeout` seconds naming `what` and the topics that came instead."""
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while (remaining := deadline - time.monotonic()) > 0:
        delivery = subscription.next(timeout=remaining)
        if delivery is None:
            continue
        if matches(delivery):
            return delivery
        seen.append(delivery.topic)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; other topics seen: {seen[-20:]}")


def run_async(coroutine: Awaitable[T], timeout: float = 60.0, what: str = "the coroutine") -> T:
    """`asyncio.run(coroutine)`, failing after `timeout` seconds naming `what` (a TimeoutError the
    coroutine raises itself passes as it is)."""

    async def bounded() -> T:
        scope = asyncio.timeout(timeout)
        try:
            async with scope:
                return await coroutine
        except TimeoutError:
            if scope.expired():
                raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None
            raise

    return asyncio.run(bounded())
