"""The egress proxy's bound on refusals recorded one by one (services/credentials/egress/refusal_limit.py):
a token bucket per caller, the rest counted and summed up. Pure: the clock is passed in."""

from __future__ import annotations

from baaaht.common.identity import AgentIdentity
from baaaht.services.credentials.egress.journal import Call
from baaaht.services.credentials.egress.refusal_limit import RefusalLimit


def refused(kind="route", session="s1", container="c1", at=1000.0, path="/nothing/x") -> Call:
    identity = (
        AgentIdentity(container_id=container, session_id=session, role="agent", install_id="t", issued_at=0.0)
        if session
        else None
    )
    return Call(
        started=0.0,
        started_at=at,
        method="GET",
        path=path,
        identity=identity,
        container_id=container,
        status=404,
        refused=kind,
        message=f"refused: {kind}",
    )


def test_refusals_within_the_rate_are_recorded_and_the_rest_counted_by_kind():
    limit = RefusalLimit(per_minute=3)
    kept = [limit.records(refused(at=1000.0 + i), now=0.0) for i in range(5)]
    kept += [limit.records(refused("method", at=1010.0, path="/anthropic/v1/messages"), now=0.0)]
    assert kept == [True, True, True, False, False, False]
    summaries = limit.summaries(now=0.0)
    assert sorted((s.last.refused, s.count, s.since, s.last.started_at) for s in summaries) == [
        ("method", 1, 1010.0, 1010.0),
        ("route", 2, 1003.0, 1004.0),
    ]
    assert limit.summaries(now=0.0) == []  # each counted once


def test_the_bucket_refills_at_the_rate():
    limit = RefusalLimit(per_minute=60)
    assert all(limit.records(refused(), now=0.0) for _ in range(60))
    assert not limit.records(refused(), now=0.5)
    assert limit.records(refused(), now=1.0)  # one a second
    assert not limit.records(refused(), now=1.0)


def test_every_container_of_a_session_shares_its_bucket_and_other_sessions_have_their_own():
    limit = RefusalLimit(per_minute=2)
    assert limit.records(refused(container="c1"), now=0.0)
    assert limit.records(refused(container="c2"), now=0.0)
    assert not limit.records(refused(container="c3"), now=0.0)  # a new worker does not escape it
    assert limit.records(refused(session="s2", container="c4"), now=0.0)
    (summary,) = limit.summaries(now=0.0)
    assert (summary.last.identity.session_id, summary.last.container_id, summary.count) == ("s1", "c3", 1)


def test_callers_without_an_identity_are_bucketed_by_container():
    limit = RefusalLimit(per_minute=1)
    assert limit.records(refused(session="", container="c1"), now=0.0)
    assert not limit.records(refused(session="", container="c1"), now=0.0)
    assert limit.records(refused(session="", container="c2"), now=0.0)
    assert limit.records(refused(session="c1", container="c9"), now=0.0)  # a session is not a container


def test_zero_records_none_one_by_one_and_sums_up_all():
    limit = RefusalLimit(per_minute=0)
    assert not any(limit.records(refused(), now=float(second)) for second in range(100))
    assert [s.count for s in limit.summaries(now=100.0)] == [100]


def test_buckets_that_filled_up_again_are_forgotten():
    limit = RefusalLimit(per_minute=60)
    limit.records(refused(session="s1"), now=0.0)
    limit.records(refused(session="s2"), now=59.5)
    limit.summaries(now=60.0)
    assert list(limit._buckets) == ["session:s2"]
