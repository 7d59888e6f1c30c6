"""An agent's session messages are published by the session service as `session.message` events with
the whole message, kept in the broker's host event history: by count alone (600 a minute), 70 messages of
1000 KiB evicted the host's whole history (64 MiB: every session's and service's events) in seconds.
limits.session_message_bytes_per_minute refuses them first, with a real broker and session service."""

from __future__ import annotations

import pytest

from baaaht.bus.errors import BusError
from baaaht.bus.testing import wait_for
from baaaht.schemas.bus import BusEventsReplay
from baaaht.schemas.errors import ErrorCode
from baaaht.schemas.sessions import SessionCreate, SessionSendMessage


@pytest.fixture
def sessions(make_host):
    host = make_host()
    host.start_service("baaaht.services.policy", "policy")
    host.start_service("baaaht.services.sessions", "session")
    return host


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
