"""What the proxy keeps of each call: a line in its hash-chained audit log and an `egress.*` event.

Both are written on one worker thread, in the order calls end, off the proxy's event loop (an
fsync per line would stall every stream in flight). The calls that end while the worker writes are
written next as one batch: one write, one fsync and one head file for all of them, so a busy proxy
costs the disk (and the event loop, which shares the GIL with the worker) per batch, not per call.
Refused calls past `egress.refusals_per_minute` come as summaries instead (refusal_limit.py).
Neither ever holds a header value, a body or a secret: names, sizes, counts and times only.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import msgspec

from baaaht.bus.service import Publisher
from baaaht.common.audit_chain import AuditLog
from baaaht.common.identity import AgentIdentity
from baaaht.schemas.egress import (
    EgressAuditRecord,
    EgressProxied,
    EgressRefusalsSuppressed,
    EgressRefused,
    SessionUsage,
)

from .routes import Target
from .usage import Usage

log = logging.getLogger("baaaht.egress")
VERIFY_HINT = "baaaht-ctl credentials audit-verify"


def audit_path(data_dir: str | Path) -> Path:
    """The egress audit log, beside the policy's under the host's data directory."""
    return Path(data_dir) / "audit" / "egress.jsonl"


@dataclass
class Call:
    """What one call has come to, filled in by the proxy as it goes."""

    started: float  # time.monotonic()
    started_at: float  # Unix time
    method: str
    path: str
    identity: AgentIdentity | None = None
    container_id: str = ""
    target: Target | None = None
    status: int = 0
    refused: str = ""
    message: str = ""
    forwarded: bool = False  # admitted by the budget and sent (or tried) upstream
    bytes_out: int = 0
    bytes_in: int = 0
    usage: Usage = Usage()
    usage_after: SessionUsage | None = None  # the session's totals once the call was counted
    duration: float = 0.0

    def who(self) -> dict[str, str]:
        """The fields every line and event of the call carries."""
        identity, target = self.identity, self.target
        return dict(
            session_id=identity.session_id if identity else "",
            container_id=self.container_id,
            role=identity.role if identity else "",
            route=target.route.name if target else "",
            method=self.method,
            path=self.path,
        )


@dataclass
class Suppressed:
    """Refused calls of one caller, container and kind not recorded one by one (refusal_limit.py)."""

    last: Call  # the latest of them, which the summary describes
    count: int
    since: float  # Unix time the first of them arrived


class Journal:
    def __init__(self, audit: AuditLog, events: Publisher):
        self.audit = audit
        self.events = events
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="egress-journal")
        self._lock = threading.Lock()
        self._pending: list[Call | Suppressed] = []  # recorded, not yet taken by the worker

    def record(self, *entries: Call | Suppressed) -> None:
        with self._lock:
            already_queued = bool(self._pending)  # a write that takes these too
            self._pending.extend(entries)
            if already_queued or not self._pending:
                return
        self._writer.submit(self._write_pending_logging_failures)

    def _write_pending_logging_failures(self) -> None:
        with self._lock:
            calls, self._pending = self._pending, []
        try:
            self._write(calls)
        except Exception:  # nobody waits on the worker's futures: say it here
            log.exception("egress calls not journalled", extra={"calls": len(calls)})

    def close(self) -> None:
        """Wait until every recorded call is written."""
        self._writer.shutdown(wait=True)

    def _write(self, entries: list[Call | Suppressed]) -> None:
        try:
            self.audit.append_all([_audit_record(entry) for entry in entries])
        except OSError as error:
            log.error(
                "egress audit lines not written",
                extra={"path": str(self.audit.path), "error": str(error), "entries": len(entries)},
            )
        for entry in entries:
            try:
                self.events.publish(_event(entry))
            except Exception as error:  # the bus being down must not stop the proxy; the audit line stands
                log.warning("egress event not published", extra={"error": str(error)})


def _tokens(call: Call) -> dict[str, int]:
    return dict(input_tokens=call.usage.input_tokens, output_tokens=call.usage.output_tokens)


def _audit_record(entry: Call | Suppressed) -> EgressAuditRecord:
    if isinstance(entry, Suppressed):
        return msgspec.structs.replace(_audit_record(entry.last), suppressed=entry.count)
    call = entry
    return EgressAuditRecord(
        seq=0,
        time=call.started_at,
        host=urlsplit(call.target.url).netloc if call.target else "",
        status=call.status,
        refused=call.refused,
        bytes_out=call.bytes_out,
        bytes_in=call.bytes_in,
        duration=call.duration,
        **call.who(),
        **_tokens(call),
    )


def _event(entry: Call | Suppressed) -> EgressRefused | EgressProxied | EgressRefusalsSuppressed:
    if isinstance(entry, Suppressed):
        last = entry.last
        return EgressRefusalsSuppressed(
            refused=last.refused, count=entry.count, since=entry.since, message=last.message, **last.who()
        )
    call = entry
    if call.usage_after is None:  # it never went upstream
        return EgressRefused(refused=call.refused, message=call.message, **call.who())
    return EgressProxied(
        status=call.status, duration=call.duration, usage=call.usage_after, **call.who(), **_tokens(call)
    )
