"""The one place where the runtime's error kinds become bus error codes.

`maps_engine_errors` wraps every RPC of a service class (streaming ones included), so an engine error that
an RPC does not handle itself reaches the caller as the fitting code with the engine's message.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Iterator, TypeVar

from baaaht.bus.errors import BusError
from baaaht.schemas.errors import ErrorCode
from baaaht.services.containers.runtime import (
    Conflict,
    EngineError,
    EngineFailure,
    EngineTimeout,
    EngineUnavailable,
    Invalid,
    NotFound,
    WrongState,
)

CODES: dict[type[EngineError], ErrorCode] = {
    NotFound: ErrorCode.NOT_FOUND,
    Conflict: ErrorCode.ALREADY_EXISTS,
    WrongState: ErrorCode.FAILED_PRECONDITION,
    Invalid: ErrorCode.INVALID_ARGUMENT,
    EngineUnavailable: ErrorCode.UNAVAILABLE,
    EngineTimeout: ErrorCode.TIMEOUT,
    EngineFailure: ErrorCode.INTERNAL,
}

C = TypeVar("C", bound=type)


def bus_error(exc: EngineError) -> BusError:
    code = next((code for kind, code in CODES.items() if isinstance(exc, kind)), ErrorCode.INTERNAL)
    return BusError(code, exc.message, {**exc.details, "target": exc.target} if exc.target else exc.details)


@contextlib.contextmanager
def as_bus_errors() -> Iterator[None]:
    try:
        yield
    except EngineError as exc:
        raise bus_error(exc) from None


def maps_engine_errors(cls: C) -> C:
    """Class decorator: every `@rpc` method raises BusError for the engine errors it lets through."""
    for spec in cls.rpcs().values():
        setattr(cls, spec.method, _mapped(getattr(cls, spec.method)))
    return cls


def _mapped(method):
    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def stream(*args, **kwargs):
            with as_bus_errors():
                yield from method(*args, **kwargs)

        return stream

    @functools.wraps(method)
    def call(*args, **kwargs):
        with as_bus_errors():
            return method(*args, **kwargs)

    return call
