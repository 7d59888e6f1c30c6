"""The session state machine, pair by pair."""

import itertools

import pytest

from baaaht.bus.errors import BusError
from baaaht.schemas.errors import ErrorCode
from baaaht.schemas.sessions import SessionState
from baaaht.services.sessions import states

S = SessionState
VALID = {
    (S.INITIALIZING, S.ACTIVE),
    (S.INITIALIZING, S.CLOSING),
    (S.ACTIVE, S.IDLE),
    (S.ACTIVE, S.CLOSING),
    (S.IDLE, S.ACTIVE),
    (S.IDLE, S.CLOSING),
    (S.CLOSING, S.CLOSED),
}
ALL_PAIRS = list(itertools.product(SessionState, repeat=2))


@pytest.mark.parametrize("current,target", sorted(VALID))
def test_valid_transition_returns_the_target(current, target):
    assert states.can_move(current, target)
    assert states.move("s1", current, target, "test") is target


@pytest.mark.parametrize("current,target", [pair for pair in ALL_PAIRS if pair not in VALID])
def test_invalid_transition_is_failed_precondition_naming_both_states(current, target):
    assert not states.can_move(current, target)
    with pytest.raises(BusError) as caught:
        states.move("s1", current, target, "do the thing")
    error = caught.value
    assert error.code is ErrorCode.FAILED_PRECONDITION
    assert f"from {current.value} to {target.value}" in error.message
    assert "cannot do the thing" in error.message
    assert error.details == {"session_id": "s1", "state": current.value, "target_state": target.value}


def test_closed_is_terminal_and_only_closing_reaches_it():
    assert not any(states.can_move(S.CLOSED, target) for target in SessionState)
    assert [s for s in SessionState if states.can_move(s, S.CLOSED)] == [S.CLOSING]
