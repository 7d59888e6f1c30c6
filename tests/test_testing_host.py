"""The test kit's waits on a real host: events on a subscription, a service's registration."""

from __future__ import annotations

import pytest

from baaaht.bus.testing import next_event
from tests.services.echo import Emit, Say, Shout


def test_next_event_on_a_subscription_names_what_it_waited_for(echo):
    client = echo.client()
    with client.subscribe(["echo."]) as events:
        client.call(Say(text="no event"))
        with pytest.raises(AssertionError, match="waiting for a shout; other topics seen: \\[\\]"):
            next_event(events, timeout=0.3, what="a shout")
        client.call(Emit(text="one", times=1))
        assert next_event(events, timeout=10, what="a shout").event == Shout(text="one")


def test_waiting_for_a_registration_that_never_comes_names_the_service(host):
    with pytest.raises(AssertionError, match=r"waiting for service nosuch \(pid 1\) to register"):
        host.wait_registered("nosuch", pid=1, timeout=0.5)
