"""Malformed messages, counted in full and logged sparingly.

A fuzzing or broken peer can send thousands of bad frames a second; one log line
each would fill the disk and rotate the broker's own start-up lines away. So each
period logs the first bad message in full, counts the rest, and ends with one
summary line (counts per kind and the busiest peers). Totals per kind stay for
`bus.stats`.
"""

from __future__ import annotations

import collections
import logging

SUMMARY_PEERS = 10  # the busiest offenders named in a summary line


class BadInput:
    def __init__(self, log: logging.Logger, period: float):
        self.log = log
        self.period = period
        self.by_kind: collections.Counter[str] = collections.Counter()
        self._period_end: float | None = None
        self._kinds: collections.Counter[str] = collections.Counter()  # this period only, then reset
        self._peers: collections.Counter[str] = collections.Counter()

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())

    def note(self, kind: str, peer: str, problem: str, now: float) -> None:
        self.by_kind[kind] += 1
        if self._period_end is None:
            self._period_end = now + self.period
            self.log.warning("malformed message", extra={"peer": peer, "kind": kind, "problem": problem})
            return
        self._kinds[kind] += 1
        self._peers[peer] += 1

    def flush(self, now: float) -> None:
        """At the end of a period: one summary line for what was not logged, then a new period."""
        if self._period_end is None or now < self._period_end:
            return
        if self._kinds:
            self.log.warning(
                "more malformed messages",
                extra={
                    "count": sum(self._kinds.values()),
                    "seconds": self.period,
                    "kinds": dict(self._kinds),
                    "peers": dict(self._peers.most_common(SUMMARY_PEERS)),
                    "other_peers": max(0, len(self._peers) - SUMMARY_PEERS),
                },
            )
        self._period_end = None
        self._kinds.clear()
        self._peers.clear()
