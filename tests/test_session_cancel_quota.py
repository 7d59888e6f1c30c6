"""An agent's session.cancel had no quota: each call publishes a `session.cancel` event (kept in
the host's history, capacity 10,000 events) and logs a line, so one agent calling it in a loop evicted the
host's whole event history within seconds and grew the session service's log without bound."""

from __future__ import annotations

import pytest

from baaaht.bus.errors import BusError
from baaaht.schemas.bus import BusEventsReplay
from baaaht.schemas.errors import ErrorCode
from baaaht.schemas.sessions import SessionCancel, SessionCreate


@pytest.fixture
def sessions(make_host):
    host = make_host({"bus": {"event_history": 200}})
    host.start_service("baaaht.services.policy", "policy")
    host.start_service("baaaht.services.sessions", "session")
    return host


def test_an_agents_cancels_are_limited_per_session(sessions):
    operator = sessions.client(timeout=30.0)
    operator.call(SessionCreate(owner="bob"))  # a host event of another session
    created = operator.call(BusEventsReplay(limit=0)).last_seq
    mine = operator.call(SessionCreate(owner="alice"))
    sessions.identify(mine.id, role="assistant")
    agent = sessions.agent_client(timeout=30.0)
    refused = None
    for _ in range(
        250
    ):  # past limits.session_cancels_per_minute (60); 250 would evict the host's 200 kept events
        try:
            agent.call(SessionCancel(session_id=mine.id))
        except BusError as error:
            refused = error
            break
    assert refused is not None and refused.code is ErrorCode.RESOURCE_EXHAUSTED, refused
    assert "limits.session_cancels_per_minute" in refused.message
    assert operator.call(BusEventsReplay(limit=0)).first_seq <= created  # still kept
