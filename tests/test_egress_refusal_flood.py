"""An agent looping on refused calls, through the real proxy (review5): every egress call, refused ones
included, was a line of the fsync'd audit log and an event the credential service publishes (kept in
the broker's HOST history), with no rate: an agent looping on a refused call (an unknown route: nothing
reaches an upstream, no budget is used) grew <data_dir>/audit/egress.jsonl without bound (disk) and
evicted the host's event history by count (bus.event_history 10,000) in seconds. Now refusals past
egress.refusals_per_minute are answered the same, counted, and summed up (refusal_limit.py)."""

from __future__ import annotations

import time

from baaaht.bus.testing import wait_for
from baaaht.common import audit_chain
from baaaht.schemas.bus import BusEventsReplay
from baaaht.schemas.credentials import CredentialChanged
from baaaht.schemas.egress import (
    EgressAuditRecord,
    EgressProxied,
    EgressRefusalsSuppressed,
    EgressRefused,
)
from baaaht.services.credentials.egress import proxy
from baaaht.services.credentials.egress.journal import audit_path
from tests.egress_support import CONTAINER, SESSION, running_egress

MESSAGE = {"model": "claude-fake", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}


def audit_lines(egress) -> list[EgressAuditRecord]:
    """The whole log, once the proxy has stopped (and summed up what it counted)."""
    path = audit_path(egress.data_dir)
    assert audit_chain.verify(path).ok
    return audit_chain.read_tail(path, 10_000, 0, EgressAuditRecord)[0]


def test_an_agent_looping_on_refused_calls_is_answered_each_time_but_summed_up_past_the_rate(tmp_path):
    with running_egress(tmp_path) as egress, egress.client() as client:
        statuses = [client.get("/nothing/x").status_code for _ in range(2000)]
    lines = audit_lines(egress)
    events = egress.events.events()
    assert set(statuses) == {404}  # each still answered
    assert len(lines) < 2000 and len(events) < 2000
    one_by_one = [line for line in lines if not line.suppressed]
    assert sum(line.suppressed for line in lines) + len(one_by_one) == 2000  # every refusal counted
    assert {type(event) for event in events} == {EgressRefused, EgressRefusalsSuppressed}


def test_a_call_that_reaches_the_upstream_past_the_refusal_rate_is_still_recorded(tmp_path):
    with running_egress(tmp_path, refusals_per_minute=2) as egress, egress.client() as client:
        refusals = [client.get("/nothing/x").status_code for _ in range(5)]
        answers = [client.post("/anthropic/v1/messages", json=MESSAGE).status_code for _ in range(3)]
    assert (refusals, answers) == ([404] * 5, [200] * 3)
    lines = audit_lines(egress)
    assert [(line.route, line.status, line.suppressed) for line in lines] == [
        ("", 404, 0),
        ("", 404, 0),
        *[("anthropic", 200, 0)] * 3,
        ("", 404, 3),  # the summary, at the stop
    ]
    assert len(egress.events.events(EgressProxied)) == 3


def test_refusals_past_the_rate_are_summed_up_once_a_period(tmp_path, monkeypatch):
    monkeypatch.setattr(proxy, "REFUSALS_SUMMED_EVERY", 0.2)
    with running_egress(tmp_path, refusals_per_minute=1) as egress, egress.client() as client:
        for _ in range(4):
            client.get("/nothing/x")
        client.delete("/anthropic/v1/messages")

        # the calls may fall in two periods: each summary counts its own
        def summed_up():
            found = egress.events.events(EgressRefusalsSuppressed)
            return found if sum(event.count for event in found) == 4 else None

        summaries = wait_for(summed_up, what="4 refusals summed up")
        counts = {kind: sum(e.count for e in summaries if e.refused == kind) for kind in ("route", "method")}
        assert counts == {"route": 3, "method": 1}
        route = next(event for event in summaries if event.refused == "route")
        method = next(event for event in summaries if event.refused == "method")
        assert (method.method, method.path) == ("DELETE", "/anthropic/v1/messages")
        assert (route.session_id, route.container_id, route.method, route.path) == (
            SESSION,
            CONTAINER,
            "GET",
            "/nothing/x",
        )
        assert route.message and route.since <= time.time()
        assert len(egress.events.events(EgressRefused)) == 1  # the first, within the rate
    lines = audit_lines(egress)
    assert [line.suppressed for line in lines if line.suppressed] == [e.count for e in summaries]


def test_the_proxys_refusals_do_not_evict_the_hosts_event_history(make_host):
    """Past the rate each caller still adds a refusal event a second and a summary a minute: kept as the
    host's, a few looping agents would still evict every session's and service's events in time."""
    host = make_host({"bus": {"event_history": 20}})
    credentials = host.service_client("credential")
    credentials.publish(
        CredentialChanged(id="k1", name="anthropic", change="rotated", version=2)
    )  # the host's
    refusal = dict(session_id=SESSION, container_id=CONTAINER, role="agent", method="GET", path="/nothing/x")
    for _ in range(30):
        credentials.publish(EgressRefused(refused="route", message="no route", **refusal))
        credentials.publish(
            EgressRefusalsSuppressed(refused="route", count=100, since=time.time(), **refusal)
        )
    operator = host.client()
    wait_for(lambda: operator.call(BusEventsReplay(limit=0)).last_seq >= 61, what="the events published")
    kept = operator.call(BusEventsReplay(since=0, topics=["credential.changed"], limit=10)).events
    assert [event.topic for event in kept] == ["credential.changed"]
