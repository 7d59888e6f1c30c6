"""Refused peers, counted in full and told sparingly (`bus.auth.failed`).

A client retrying with a wrong key fails its handshake several times a second, for as long as it
runs: one log line and one event each would flood the log and evict the host's event history. So
each reason's first refusal of a period is logged and published in full; the rest of that period
are counted and summed up in one log line and one event (`count`) when the period ends. Totals per
reason stay for `bus.stats`.
"""

from __future__ import annotations

import collections
import logging

import msgspec

from baaaht.schemas.bus import BusAuthFailed


def _fields(failure: BusAuthFailed) -> dict:
    fields = msgspec.structs.asdict(failure)
    fields["problem"] = fields.pop("message")  # `message` is the log record's own
    return fields


class AuthFailures:
    def __init__(self, log: logging.Logger, period: float):
        self.log = log
        self.period = period
        self.by_reason: collections.Counter[str] = collections.Counter()
        self._period_end: dict[str, float] = {}  # reason -> when its period ends
        self._held: dict[str, BusAuthFailed] = {}  # reason -> the period's summary so far

    def note(self, failure: BusAuthFailed, now: float) -> list[BusAuthFailed]:
        """Count one refusal; returns the events to publish now."""
        reason = failure.reason
        self.by_reason[reason] += 1
        due = self.flush(now)
        if reason not in self._period_end:
            self._period_end[reason] = now + self.period
            self.log.warning("refused a peer", extra=_fields(failure))
            return [*due, failure]
        held = self._held.get(reason)
        self._held[reason] = msgspec.structs.replace(failure, count=held.count + 1 if held else 1)
        return due

    def flush(self, now: float) -> list[BusAuthFailed]:
        """The summaries of the periods that have ended (their refusals not told one by one)."""
        due = []
        for reason in [r for r, end in self._period_end.items() if now >= end]:
            del self._period_end[reason]
            summary = self._held.pop(reason, None)
            if summary is not None:
                self.log.warning(
                    "more refused peers",
                    extra={
                        "reason": reason,
                        "count": summary.count,
                        "seconds": self.period,
                        "last": summary.message,
                    },
                )
                due.append(summary)
        return due
