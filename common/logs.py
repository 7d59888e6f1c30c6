"""Structured logs on stderr, the same shape from every process of the host.

Each record carries time, level, process (the host process's name: `broker`, `policy`,
...), pid, logger and message, plus whatever the caller passed as `extra={...}`:

    log.info("service registered", extra={"service": "policy", "instance": "a1b2"})

JSON lines (`log.format: json`) are for machines; text is for people at a terminal.
Keeping secrets out of `extra` is the caller's job.
"""

from __future__ import annotations

import logging
import sys
import traceback
from datetime import datetime, timezone
from typing import Any, TextIO

import orjson

from baaaht.schemas.config import LogConfig

HANDLER_NAME = "baaaht.structured"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING, "error": logging.ERROR}
_LEVEL_NAMES = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warn", logging.ERROR: "error"}
# Attributes every LogRecord has: anything else on a record came from `extra`.
_RECORD_ATTRIBUTES = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


def _level_name(levelno: int) -> str:
    return _LEVEL_NAMES.get(levelno, "critical" if levelno > logging.ERROR else "debug")


class StructuredFormatter(logging.Formatter):
    """Turns a record into one line: JSON or `time level process logger: message key=value`."""

    def __init__(self, process: str, as_json: bool):
        super().__init__()
        self.process = process
        self.as_json = as_json

    def fields(self, record: logging.LogRecord) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": _level_name(record.levelno),
            "process": self.process,
            "pid": record.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        extra = {key: value for key, value in record.__dict__.items() if key not in _RECORD_ATTRIBUTES}
        # A caller's field never replaces one of ours: it is kept under its own name with a prefix.
        fields.update({f"extra.{key}" if key in fields else key: value for key, value in extra.items()})
        if record.exc_info:
            fields["exception"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        if record.stack_info:
            fields["stack"] = record.stack_info
        return fields

    def format(self, record: logging.LogRecord) -> str:
        fields = self.fields(record)
        if self.as_json:
            return orjson.dumps(fields, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
        head = f"{fields.pop('time')} {fields.pop('level'):<5} {fields.pop('process')}[{fields.pop('pid')}]"
        line = f"{head} {fields.pop('logger')}: {fields.pop('message')}"
        exception = fields.pop("exception", None)
        stack = fields.pop("stack", None)
        pairs = " ".join(
            f"{key}={orjson.dumps(value, default=str).decode()}" for key, value in fields.items()
        )
        return "\n".join(part for part in (f"{line} {pairs}".rstrip(), exception, stack) if part)


def setup_logging(log_config: LogConfig, process: str, stream: TextIO | None = None) -> None:
    """Send every logger's records to stderr (or `stream`), formatted per `log_config`.

    Calling it again replaces the handler it installed before; other handlers (a test
    runner's, say) are left alone.
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(StructuredFormatter(process, as_json=log_config.format == "json"))
    handler.set_name(HANDLER_NAME)
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(LEVELS[log_config.level])
