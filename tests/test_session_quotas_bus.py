"""What the agents of one session may cause, with a real broker and session service: each of their
cancels and messages is a host event kept for replay, so a loop of either evicted the host's whole event
history within seconds. session.cancel had no quota (each call also logs a line); session.send_message
was counted (600 a minute) but not in bytes, and 70 messages of 1000 KiB evicted the 64 MiB history."""

from __future__ import annotations

import pytest

from baaaht.bus.errors import BusError
from baaaht.bus.testing import wait_for
from baaaht.schemas.bus import BusEventsReplay
from baaaht.schemas.errors import ErrorCode
from baaaht.schemas.sessions import SessionCancel, SessionCreate, SessionSendMessage


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


def test_an_agents_messages_do_not_evict_the_hosts_event_history(sessions):
    operator = sessions.client(timeout=30.0)
    operator.call(SessionCreate(owner="bob"))  # a host event
    created = operator.call(BusEventsReplay(limit=0)).last_seq
    mine = operator.call(SessionCreate(owner="alice"))
    sessions.identify(mine.id)
    agent = sessions.agent_client(timeout=30.0)
    before = operator.call(BusEventsReplay(limit=0)).last_seq
    sent = 0
    for _ in range(70):
        try:
            agent.call(SessionSendMessage(session_id=mine.id, role="assistant", content="x" * (1000 << 10)))
        except BusError as refused:
            assert refused.code is ErrorCode.RESOURCE_EXHAUSTED
            assert "limits.session_message_bytes_per_minute" in refused.message
            break
        sent += 1
    assert 0 < sent < 70
    wait_for(lambda: operator.call(BusEventsReplay(limit=0)).last_seq >= before + sent, timeout=30.0)
    assert operator.call(BusEventsReplay(limit=0)).first_seq <= created  # nothing of the host's evicted
