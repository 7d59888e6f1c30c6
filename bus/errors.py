"""The one exception type that crosses the bus, carrying an ErrorCode."""

from __future__ import annotations

import re
from typing import Any

import msgspec

from baaaht.schemas.errors import ErrorBody, ErrorCode

_PATH = re.compile(r" - at `(\$[^`]*)`$")


class BusError(Exception):
    """Raised by handlers to answer with an error, and by clients on an error reply."""

    def __init__(self, code: ErrorCode, message: str, details: dict[str, Any] | None = None):
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message
        self.details = details or {}

    def body(self) -> ErrorBody:
        return ErrorBody(code=self.code, message=self.message, details=self.details)

    @classmethod
    def from_body(cls, body: ErrorBody) -> "BusError":
        return cls(body.code, body.message, body.details)


def validation_error(target: str, exc: msgspec.DecodeError) -> BusError:
    """INVALID_ARGUMENT naming the failing field path, e.g. `$.spec.image`."""
    match = _PATH.search(str(exc))
    details = {"path": match.group(1)} if match else {}
    return BusError(ErrorCode.INVALID_ARGUMENT, f"invalid {target} request: {exc}", details)


def invalid(message: str, **details: Any) -> BusError:
    return BusError(ErrorCode.INVALID_ARGUMENT, message, details)


def not_found(message: str, **details: Any) -> BusError:
    return BusError(ErrorCode.NOT_FOUND, message, details)


def precondition(message: str, **details: Any) -> BusError:
    return BusError(ErrorCode.FAILED_PRECONDITION, message, details)


def exhausted(message: str, **details: Any) -> BusError:
    return BusError(ErrorCode.RESOURCE_EXHAUSTED, message, details)


def unavailable(message: str, **details: Any) -> BusError:
    return BusError(ErrorCode.UNAVAILABLE, message, details)
