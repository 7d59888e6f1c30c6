"""Typed peers: methods from the schemas, the caller's deadline and correlation, errors mapped once."""

from __future__ import annotations

import time

import pytest

from baaaht.bus.errors import BusError, not_found, unavailable
from baaaht.bus.peers import Peer
from baaaht.bus.service import CallContext
from baaaht.bus.testing import FakeBus
from baaaht.schemas.containers import ContainerSpec
from baaaht.schemas.errors import ErrorCode
from baaaht.schemas.policy import Decision, PolicyEvaluate, ValidationResult
from baaaht.schemas.sessions import SessionGet
from tests.services.echo import Say

SPEC = ContainerSpec(image="busybox:1")
DECISION = Decision(
    decision_id="d1", allowed=True, outcome="allow", mode="strict", policy_version="v1", enforced=SPEC
)


def caller(seconds: float) -> CallContext:
    return CallContext(correlation_id="corr-1", deadline=time.time() + seconds)


def test_methods_come_from_the_schemas_and_build_the_request():
    bus = FakeBus(default=DECISION)
    policy = Peer(bus, "policy", timeout=5.0)
    spec = SPEC
    assert policy.evaluate(None, spec=spec, host_containers=2) == DECISION
    ((request, timeout, correlation),) = bus.calls
    assert request == PolicyEvaluate(spec=spec, host_containers=2)
    assert (timeout, correlation) == (5.0, "")
    assert "PolicyValidate -> ValidationResult" in policy.validate.__doc__
    with pytest.raises(AttributeError, match="has no method 'evalute'.*evaluate"):
        policy.evalute(None, spec=spec)
    with pytest.raises(ValueError, match="session.get is not a method of service 'policy'"):
        policy.call(SessionGet(session_id="s1"))
    with pytest.raises(ValueError, match="no request type of a service 'nosuch'"):
        Peer(bus, "nosuch", timeout=1.0)


def test_a_call_never_outlives_the_callers_deadline_and_carries_its_correlation():
    bus = FakeBus(default=ValidationResult(valid=True))
    policy = Peer(bus, "policy", timeout=5.0)
    policy.validate(caller(1.0), text="{}")
    policy.validate(caller(60.0), text="{}")
    (_, short, correlation), (_, long, _) = bus.calls
    assert 0 < short <= 1.0 and correlation == "corr-1"
    assert long == 5.0  # the peer's own timeout when the caller has longer
    with pytest.raises(BusError) as caught:
        policy.validate(caller(-1.0), text="{}")
    assert caught.value.code is ErrorCode.TIMEOUT and len(bus.calls) == 2  # not even asked


@pytest.mark.parametrize(
    "error, ctx_seconds, code, peer_error",
    [
        (
            unavailable("no instance of service 'policy' is registered"),
            60.0,
            ErrorCode.UNAVAILABLE,
            "UNAVAILABLE",
        ),
        (
            BusError(ErrorCode.INTERNAL, "policy.validate failed: boom"),
            60.0,
            ErrorCode.UNAVAILABLE,
            "INTERNAL",
        ),
        # The peer's timeout was shorter than the caller's deadline: the peer was not consulted.
        (BusError(ErrorCode.TIMEOUT, "no answer"), 60.0, ErrorCode.UNAVAILABLE, "TIMEOUT"),
        # The caller's own deadline ran out: that is what the caller is told.
        (BusError(ErrorCode.TIMEOUT, "no answer"), 1.0, ErrorCode.TIMEOUT, None),
        # The peer's own answer passes as it is.
        (not_found("no such thing", thing="x"), 60.0, ErrorCode.NOT_FOUND, None),
    ],
)
def test_errors_are_mapped_once(error, ctx_seconds, code, peer_error):
    policy = Peer(FakeBus(default=error), "policy", timeout=5.0)
    with pytest.raises(BusError) as caught:
        policy.validate(caller(ctx_seconds), text="{}")
    assert caught.value.code is code
    if peer_error is not None:
        assert caught.value.details == {"peer": "policy", "peer_error": peer_error}
        assert caught.value.message.startswith("the policy service could not be consulted")
    elif code is ErrorCode.NOT_FOUND:
        assert caught.value is error


def test_a_peer_decides_which_errors_are_its_answers():
    only_denials = Peer(
        FakeBus(default=not_found("no method")),
        "policy",
        timeout=5.0,
        answered=lambda error, request: error.code is ErrorCode.PERMISSION_DENIED,
    )
    with pytest.raises(BusError) as caught:
        only_denials.validate(None, text="{}")
    assert caught.value.code is ErrorCode.UNAVAILABLE and caught.value.details["peer_error"] == "NOT_FOUND"


def test_over_the_bus_a_slow_peer_is_given_up_at_the_callers_deadline(echo):
    """The deadline travels with the call: the broker answers TIMEOUT at the caller's deadline,
    well before the peer's own (longer) timeout."""
    peer = Peer(echo.client(), "echo", timeout=30.0)
    started = time.monotonic()
    with pytest.raises(BusError) as caught:
        peer.call(Say(text="slow", delay=20.0), caller(0.5))
    assert caught.value.code is ErrorCode.TIMEOUT
    assert time.monotonic() - started < 15  # bounded by the caller's 0.5 s, never the peer's 30 s
    assert peer.say(caller(5.0), text="hi").text == "hi"
