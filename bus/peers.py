"""Typed clients of the services a service calls: one per peer, its methods made from `schemas/`.

    policy = Peer(bus, "policy", timeout=5.0)
    decision = policy.evaluate(ctx, spec=spec, principal=principal)      # PolicyEvaluate -> Decision
    containers = Peer(bus, "container", timeout=5.0)
    containers.destroy(None, id=container_id, force=True)              # no caller: the peer's timeout

Every method of the peer service that has a request type in `schemas/` is a method of its Peer,
named as on the wire after the service's name (`policy.evaluate` -> `evaluate`), taking the
caller's CallContext (or None in background work) and the request's fields. Two things are done
here once for every peer:

- the deadline: a call never outlives the caller's own deadline (nor the peer's timeout), and it
  carries the caller's correlation id;
- errors: what the peer answered (its judgement of the request: NOT_FOUND, PERMISSION_DENIED, ...)
  is raised as it is; an error that means the peer was not consulted (none registered or healthy,
  it broke, it did not answer in time) is raised as UNAVAILABLE naming the peer, or as TIMEOUT when
  it was the caller's own deadline that ran out.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

from baaaht.bus.errors import BusError
from baaaht.bus.service import CallContext
from baaaht.schemas.base import Request, known_types, target_of
from baaaht.schemas.errors import ErrorCode

# Errors that do not come from the peer's judgement of the request.
NOT_CONSULTED = frozenset({ErrorCode.UNAVAILABLE, ErrorCode.TIMEOUT, ErrorCode.CANCELLED, ErrorCode.INTERNAL})


class Calls(Protocol):
    """The bus as a peer needs it: the runner's BusClient, or a fake in unit tests."""

    def call(self, request: Request, timeout: float | None = None, correlation_id: str = "") -> Any: ...


def consulted(error: BusError, request: Request) -> bool:
    """The default: any error outside NOT_CONSULTED is the peer's answer."""
    return error.code not in NOT_CONSULTED


def requests_of(service: str) -> dict[str, type[Request]]:
    """The request types of a service's methods, by method name."""
    prefix = service + "."
    return {
        tag[len(prefix) :]: cls
        for tag, cls in known_types().items()
        if isinstance(cls, type) and issubclass(cls, Request) and tag.startswith(prefix)
    }


class Peer:
    def __init__(
        self,
        bus: Calls,
        service: str,
        *,
        timeout: float,
        answered: Callable[[BusError, Request], bool] = consulted,
    ):
        """`answered(error, request)` says whether an error is the peer's own answer (raised as it
        is); the default takes every error outside NOT_CONSULTED for one."""
        self.bus = bus
        self.service = service
        self.timeout = timeout
        self.answered = answered
        self.requests = requests_of(service)
        if not self.requests:
            raise ValueError(f"schemas/ has no request type of a service {service!r}")

    def __getattr__(self, method: str) -> Callable[..., Any]:
        request_type = self.__dict__.get("requests", {}).get(method)
        if request_type is None:
            raise AttributeError(
                f"service {self.__dict__.get('service')!r} has no method {method!r}"
                f" (it has {', '.join(sorted(self.__dict__.get('requests', {})))})"
            )

        def call(ctx: CallContext | None, /, **fields: Any) -> Any:
            return self.call(request_type(**fields), ctx)

        call.__name__ = method
        response = request_type.response.__name__
        call.__doc__ = f"{target_of(request_type)}: {request_type.__name__} -> {response}"
        return call

    def call(self, request: Request, ctx: CallContext | None = None) -> Any:
        """Ask the peer, within the caller's deadline; the typed response or an error as above."""
        target = target_of(type(request))
        if not target.startswith(self.service + "."):
            raise ValueError(f"{target} is not a method of service {self.service!r}")
        timeout, bound_by_caller = self.timeout, False
        if ctx is not None and ctx.remaining() < self.timeout:
            timeout, bound_by_caller = max(0.0, ctx.remaining()), True
        if timeout <= 0:
            raise BusError(ErrorCode.TIMEOUT, f"the call's deadline passed before {target} could be asked")
        try:
            return self.bus.call(request, timeout=timeout, correlation_id=ctx.correlation_id if ctx else "")
        except BusError as exc:
            if self.answered(exc, request):
                raise
            if exc.code is ErrorCode.TIMEOUT and bound_by_caller:
                raise BusError(
                    ErrorCode.TIMEOUT,
                    f"the call's deadline passed while the {self.service} service was asked ({target})",
                    {"peer": self.service},
                ) from None
            raise BusError(
                ErrorCode.UNAVAILABLE,
                f"the {self.service} service could not be consulted ({exc.code.value}: {exc.message})",
                {"peer": self.service, "peer_error": exc.code.value},
            ) from None
