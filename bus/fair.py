"""Fair queueing of a service's work: round-robin over callers, each with a bounded backlog and a
bounded share of the handler threads.

A service's handler threads take the next call from here rather than in arrival order, so a
caller that sends thousands of calls waits behind its own backlog, not the others behind theirs:
every other caller's next call is at most one call per busy caller away. A caller may also run at
most `max_running` calls at once (its share of the threads): the handlers of one service share one
interpreter lock, so a call's time grows with the number of handlers running beside it, and a
caller holding every thread would slow everybody else's calls even when they get their turn.
A caller is whoever the broker stamped (bus/runner.py `caller_key`: the container for agents, the
peer for host peers). Thread-safe: the connection's I/O thread puts, handler threads take.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Hashable
from typing import Generic, TypeVar

Item = TypeVar("Item")


class FairQueue(Generic[Item]):
    def __init__(self, per_caller: int):
        self.per_caller = per_caller
        # Callers with work queued, in the order they get their next turn (dicts keep insertion order).
        self._queues: dict[Hashable, collections.deque[Item]] = {}
        self._running: dict[Hashable, int] = {}
        self._max_running: dict[Hashable, int] = {}  # of callers with work queued or running
        self._ready = threading.Condition()
        self._closed = False
        # Handler threads waiting in take(), and how many of them were woken and have yet to look:
        # a call wakes a thread only when no woken one is on its way (a taker wakes the next one
        # while calls remain), so a burst of calls does not wake every idle handler at once.
        self._idle = 0
        self._woken = 0

    def put(self, caller: Hashable, item: Item, max_running: int) -> bool:
        """Queue `item` behind the caller's earlier ones; False (and not queued) when the caller
        already has `per_caller` waiting. The caller runs at most `max_running` of its calls at once."""
        with self._ready:
            queue = self._queues.get(caller)
            if queue is None:
                queue = self._queues[caller] = collections.deque()
            elif len(queue) >= self.per_caller:
                return False
            queue.append(item)
            self._max_running[caller] = max(1, max_running)
            if not self._woken:
                self._wake_one()
            return True

    def start_now(self, caller: Hashable, max_running: int) -> bool:
        """Count a call of `caller` as running at once, without queueing it (bus/runner.py serves it
        on the spot), when the caller has none waiting and runs fewer than `max_running`; until
        `done(caller)` it holds its share as a taken call does. False (nothing counted) otherwise:
        the call queues behind the caller's earlier ones, or waits for its share, as any other."""
        with self._ready:
            running = self._running.get(caller, 0)
            if self._closed or caller in self._queues or running >= max(1, max_running):
                return False
            self._running[caller] = running + 1
            self._max_running[caller] = max(1, max_running)
            return True

    def _wake_one(self) -> None:
        """Under the lock: wake one waiting taker, if one waits and none was woken already."""
        if self._idle > self._woken:
            self._woken += 1
            self._ready.notify()

    def take(self, timeout: float | None = None) -> tuple[Hashable, Item] | None:
        """The oldest item of the next caller in turn below its running share, counted as running
        until `done(caller)`; that caller then goes to the back. None once closed, or after
        `timeout` with nothing to take."""
        with self._ready:
            while not self._closed:
                for caller, queue in self._queues.items():
                    if self._running.get(caller, 0) < self._max_running[caller]:
                        item = queue.popleft()
                        del self._queues[caller]
                        if queue:
                            self._queues[caller] = queue
                        self._running[caller] = self._running.get(caller, 0) + 1
                        if self._queues and not self._woken:
                            self._wake_one()  # more to take: the next taker is on its way
                        return caller, item
                self._idle += 1
                try:
                    notified = self._ready.wait(timeout)
                finally:
                    self._idle -= 1
                # A timed-out wait may have been notified too late to count: never more woken than waiting.
                self._woken = min(max(0, self._woken - 1) if notified else self._woken, self._idle)
                if not notified:
                    return None
            return None

    def done(self, caller: Hashable) -> None:
        """A call of `caller` taken from here has finished: its thread share is free again."""
        with self._ready:
            left = self._running.pop(caller) - 1
            if left:
                self._running[caller] = left
            elif caller not in self._queues:
                del self._max_running[caller]
            if caller in self._queues:  # only its share held its next call back: else no taker can move
                self._wake_one()

    def close(self) -> None:
        """Every take returns None from now on; what is still queued stays unserved."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()

    def queued(self, caller: Hashable) -> int:
        with self._ready:
            queue = self._queues.get(caller)
            return len(queue) if queue else 0

    def __len__(self) -> int:
        with self._ready:
            return sum(len(queue) for queue in self._queues.values())
