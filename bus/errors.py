"""The one exception type that crosses the bus, carrying an ErrorCode."""

from __future__ import annotations

from typing import Any

import msgspec

from baaaht.schemas.errors import ErrorBody, ErrorCode

# msgspec (0.23) puts the location of a failure only in its message, "<problem> - at `<path>`", and
# leaves the suffix out at the top level; a missing field is named in the problem, not the path.
# Paths are built from field names, `[index]` and `[...]` (dict values): never a backtick, so the
# last " - at `" starts the location even when the problem quotes the caller's data.
_LOCATION = " - at `"
_MISSING = "Object missing required field `"


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


def validation_error(target: str, exc: msgspec.DecodeError | RecursionError) -> BusError:
    """INVALID_ARGUMENT naming the failing field path, e.g. `$.spec.image` (also for a missing field).
    A body that is not msgpack at all has no path."""
    details = {"path": failing_path(exc)} if isinstance(exc, msgspec.ValidationError) else {}
    return BusError(ErrorCode.INVALID_ARGUMENT, f"invalid {target} request: {exc}", details)


def failing_path(exc: msgspec.ValidationError) -> str:
    """The path of the value a validation failed on; for a missing field, the field's own path."""
    problem, found, location = str(exc).rpartition(_LOCATION)
    if found and location.endswith("`"):
        path = location[:-1]
    else:
        problem, path = str(exc), "$"
    if problem.startswith(_MISSING) and problem.endswith("`"):
        path += "." + problem[len(_MISSING) : -1]
    return path


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
