"""The egress proxy's pure parts: route matching, header rewriting, usage parsing, budgets."""

from __future__ import annotations

import asyncio
import base64
import errno
import logging
import socket

import msgspec
import pytest

from baaaht.common.identity import AgentIdentity
from baaaht.schemas.config import EgressConfig, EgressRoute
from baaaht.schemas.egress import SessionUsage
from baaaht.services.credentials.egress import callers as egress_callers
from baaaht.services.credentials.egress.budgets import Budgets
from baaaht.services.credentials.egress.headers import agent_headers, injected, upstream_headers
from baaaht.services.credentials.egress.proxy import EgressProxy
from baaaht.services.credentials.egress.refusals import Refused
from baaaht.services.credentials.egress.routes import RouteTable, path_problem, redirect_location
from baaaht.services.credentials.egress.scrub import REDACTED, echo_forms, scrub, scrub_headers
from baaaht.services.credentials.egress.usage import Usage, UsageReader, usage_reader, with_usage_requested

UPSTREAM = "https://api.example.com"


def route(**overrides) -> EgressRoute:
    fields = dict(
        name="llm",
        upstream=UPSTREAM,
        credential="key",
        paths=["/v1/messages", "/v1/models"],
        roles=["agent"],
        methods=["POST", "GET"],
    )
    return EgressRoute(**{**fields, **overrides})


def who(role: str = "agent", session: str = "s1") -> AgentIdentity:
    return AgentIdentity(container_id="a" * 64, session_id=session, role=role, install_id="i", issued_at=0.0)


def table(*routes: EgressRoute, **settings) -> RouteTable:
    return RouteTable(EgressConfig(routes=list(routes) or [route()], **settings))


def refusal(call) -> Refused:
    with pytest.raises(Refused) as caught:
        call()
    return caught.value


# -- routes ----------------------------------------------------------------------------------------


def test_a_matching_call_goes_to_the_upstream_below_its_base_path_with_its_query():
    target = table(route(upstream=UPSTREAM + "/base/")).target(who(), "POST", "/llm/v1/messages", "beta=1")
    assert target.url == "https://api.example.com/base/v1/messages?beta=1"
    assert target.path == "/v1/messages"


@pytest.mark.parametrize(
    "role, session, method, path, refused, status",
    [
        ("agent", "s1", "POST", "/nothing/v1/messages", "route", 404),
        ("worker", "s1", "POST", "/llm/v1/messages", "role", 403),
        ("agent", "s2", "POST", "/limited/v1/messages", "session", 403),
        ("agent", "s1", "DELETE", "/llm/v1/messages", "method", 405),
        ("agent", "s1", "POST", "/llm/v1/files", "path", 403),
        ("agent", "s1", "POST", "/llm/v1/messagesx", "path", 403),  # prefixes match whole segments
        ("agent", "s1", "POST", "/llm/v1/organizations/api_keys", "path", 403),  # the denylist wins
        ("agent", "s1", "POST", "/llm/V1/Organizations/api_keys", "path", 403),  # whatever the case
        ("agent", "s1", "POST", "/llm/v1/messages/../organizations", "path", 400),
        ("agent", "s1", "POST", "/llm/v1/messages/%2e%2e/organizations", "path", 400),
        ("agent", "s1", "POST", "/llm/v1/messages%2F..%2Forganizations", "path", 400),
        ("agent", "s1", "POST", "/llm//v1/messages", "path", 400),
        ("agent", "s1", "POST", "/llm/v1/messages\\..", "path", 400),
    ],
)
def test_each_rule_refuses_with_what_it_refused(role, session, method, path, refused, status):
    routes = table(
        route(paths=["/v1/messages", "/v1/organizations"]),
        route(name="limited", sessions=["s1"]),
    )
    found = refusal(lambda: routes.target(who(role, session), method, path, ""))
    assert (found.refused, found.status) == (refused, status)
    assert msgspec.json.decode(found.body())["error"]["refused"] == refused


def test_an_unknown_route_names_only_the_routes_open_to_the_caller():
    routes = table(route(), route(name="workers-only", roles=["worker"]))
    message = refusal(lambda: routes.target(who(), "POST", "/nope/x", "")).message
    assert "llm" in message and "workers-only" not in message


def test_sub_paths_of_an_allowed_prefix_pass():
    assert (
        table().target(who(), "POST", "/llm/v1/messages/count_tokens", "").path == "/v1/messages/count_tokens"
    )


@pytest.mark.parametrize(
    "path",
    [
        "/llm/v1/messages/batches",
        "/llm/v1/Messages/Batches/b1/results",
        "/llm/v1/batches",
        "/llm/v1/fine_tuning/jobs",
    ],
)
def test_work_no_token_budget_can_count_is_refused_though_a_route_allows_its_prefix(path):
    """A message batch or a fine-tuning job bills the key for tokens that no answer reports: one call of
    a session's budget would start up to 100k model calls that egress.session_tokens never sees."""
    routes = table(route(paths=["/v1"]))
    found = refusal(lambda: routes.target(who(), "POST", path, ""))
    assert (found.refused, found.status) == ("path", 403)
    assert "egress.deny_paths refuses on every route" in found.message


@pytest.mark.parametrize("path", ["/a/b", "/a/b/", "/a/b.c", "/a/b;c=d"])
def test_ordinary_paths_have_no_problem(path):
    assert path_problem(path) == ""


@pytest.mark.parametrize(
    "path",
    ["a/b", "/a//b", "/a/./b", "/a/..", "/a/%2f", "/a/%5C", "/a/%zz", "/a b", "/a/\x00", "/a/b\\c", "/a/%41"],
)
def test_ambiguous_paths_have_a_problem(path):
    assert path_problem(path) != ""


def test_route_config_refuses_plain_http_except_to_loopback_when_allowed():
    with pytest.raises(ValueError, match="https"):
        route(upstream="http://api.example.com")
    with pytest.raises(ValueError, match="https"):
        route(upstream="http://127.0.0.1:8080")
    assert route(upstream="http://127.0.0.1:8080", allow_loopback_http=True)
    with pytest.raises(ValueError, match="https"):
        route(upstream="http://api.example.com", allow_loopback_http=True)
    with pytest.raises(ValueError, match="roles"):
        route(roles=[])
    with pytest.raises(ValueError, match="header"):
        route(inject="header")


def test_a_redirect_is_followed_only_to_the_same_origin_and_base_path():
    base = route(upstream=UPSTREAM + "/base")
    here = UPSTREAM + "/base/v1/messages"
    assert redirect_location(base, "/base/v1/models?x=1", here) == "/llm/v1/models?x=1"
    assert redirect_location(base, "https://API.example.com:443/base/v1/models", here) == "/llm/v1/models"
    for elsewhere in (
        "https://evil.example.net/base/v1",
        "http://api.example.com/base/v1",
        "/other",
        "//evil.example.net/base",
    ):
        assert (
            refusal(lambda elsewhere=elsewhere: redirect_location(base, elsewhere, here)).refused
            == "redirect"
        )


# -- headers ---------------------------------------------------------------------------------------


def test_every_credential_the_agent_sends_is_dropped_and_the_route_injects_its_own():
    sent = [
        ("Authorization", "Bearer agent-made"),
        ("X-Api-Key", "agent-made"),
        ("Proxy-Authorization", "Basic x"),
        ("Cookie", "session=1"),
        ("X-Custom-Key", "agent-made"),
        ("Connection", "keep-alive, X-Hop"),
        ("X-Hop", "1"),
        ("Host", "egress"),
        ("Content-Length", "10"),
        ("Accept-Encoding", "gzip"),
        ("anthropic-version", "2023-06-01"),
    ]
    custom = route(inject="header", header="x-custom-key")
    headers = upstream_headers(sent, custom, injected(custom, "api_key", b"real"))
    assert headers == [
        ("anthropic-version", "2023-06-01"),
        ("Accept-Encoding", "identity"),
        ("x-custom-key", "real"),
    ]


@pytest.mark.parametrize(
    "inject, kind, value, header",
    [
        ("bearer", "api_key", b"k1", ("Authorization", "Bearer k1")),
        ("x-api-key", "api_key", b"k1", ("x-api-key", "k1")),
        ("basic", "basic", b"user:pw", ("Authorization", "Basic " + base64.b64encode(b"user:pw").decode())),
    ],
)
def test_injection_forms(inject, kind, value, header):
    assert injected(route(inject=inject), kind, value) == header


def test_a_secret_that_would_break_the_header_is_refused_without_showing_it():
    found = refusal(lambda: injected(route(), "api_key", b"k1\r\nX-Evil: 1"))
    assert found.refused == "credential" and b"k1" not in found.body()


def test_responses_lose_hop_by_hop_headers_and_cookies_and_turn_buffering_off():
    back = agent_headers(
        [("Content-Type", "text/event-stream"), ("Set-Cookie", "a=1"), ("Transfer-Encoding", "chunked")]
    )
    assert back == [("Content-Type", "text/event-stream"), ("X-Accel-Buffering", "no")]


# -- usage -----------------------------------------------------------------------------------------


def sse(*documents: dict) -> bytes:
    return b"".join(b"event: x\ndata: " + msgspec.json.encode(d) + b"\n\n" for d in documents)


ANTHROPIC_STREAM = sse(
    {
        "type": "message_start",
        "message": {"usage": {"input_tokens": 25, "output_tokens": 1, "cache_read_input_tokens": 5}},
    },
    {"type": "content_block_delta", "delta": {"text": "hi"}},
    {"type": "message_delta", "usage": {"output_tokens": 9}},
    {"type": "message_delta", "usage": {"output_tokens": 15}},
)
OPENAI_STREAM = (
    sse(
        {"choices": [{"delta": {"content": "hi"}}]},
        {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}},
    )
    + b"data: [DONE]\n\n"
)


@pytest.mark.parametrize(
    "content_type, body, usage",
    [
        ("text/event-stream", ANTHROPIC_STREAM, Usage(30, 15)),
        ("text/event-stream; charset=utf-8", OPENAI_STREAM, Usage(7, 3)),
        ("application/json", b'{"usage": {"input_tokens": 4, "output_tokens": 2}}', Usage(4, 2)),
        ("application/json", b'{"usage": {"prompt_tokens": 4, "completion_tokens": 2}}', Usage(4, 2)),
        (
            "application/json",
            b'{"response": {"usage": {"input_tokens": 4, "output_tokens": 6}}}',
            Usage(4, 6),
        ),
        ("application/json", b'{"usage": "lots", "x": 1}', Usage(0, 0)),
        ("application/json", b"not json", Usage(0, 0)),
        ("text/event-stream", b'data: {"usage": {"output_tokens": true}}\n\n', Usage(0, 0)),
    ],
)
def test_usage_is_read_whatever_the_chunking(content_type, body, usage):
    for size in (1, 7, len(body)):
        reader = UsageReader(content_type)
        for start in range(0, len(body), size):
            reader.feed(body[start : start + size])
        assert reader.usage() == usage, size


def test_usage_is_read_only_from_bodies_that_can_carry_it():
    for readable in ("text/event-stream", "application/json; charset=utf-8", "application/problem+json", ""):
        assert isinstance(usage_reader(readable), UsageReader), readable
    for other in ("application/octet-stream", "text/plain", "image/png"):
        assert usage_reader(other) is None, other


def test_whole_lines_inside_one_chunk_are_read_and_a_line_over_the_cap_is_skipped(monkeypatch):
    from baaaht.services.credentials.egress import usage as usage_module

    monkeypatch.setattr(usage_module, "MAX_KEPT", 64)
    reader = UsageReader("text/event-stream")
    reader.feed(
        b'event: x\ndata: {"usage": {"input_tokens": 2}}\n'
        b'data: {"usage": {"output_tokens": 99}, "pad": "' + b"x" * 100 + b'"}\n'
        b'data: {"usage": {"output_tokens": 4}}\ndata: {"usa'
    )
    reader.feed(b'ge": {"output_tokens": 5}}\n')
    assert reader.usage() == Usage(2, 5)


def test_a_stream_ending_without_a_newline_still_counts_its_last_line():
    reader = UsageReader("text/event-stream")
    reader.feed(b'data: {"usage": {"output_tokens": 3}}')
    assert reader.usage() == Usage(0, 3)


def test_openai_streaming_requests_ask_for_the_usage_chunk_and_others_stay_as_they_are():
    asked = msgspec.json.decode(with_usage_requested(b'{"stream": true, "stream_options": {"x": 1}}'))
    assert asked["stream_options"] == {"x": 1, "include_usage": True}
    for body in (
        b'{"stream": false}',
        b"not json",
        b"[1]",
        b'{"stream": true, "stream_options": {"include_usage": true}}',
    ):
        assert with_usage_requested(body) == body


# -- budgets ---------------------------------------------------------------------------------------


def test_a_session_past_its_request_cap_is_refused_429_naming_the_budget_and_others_go_on():
    budgets = Budgets(request_cap=2, token_cap=0)
    budgets.admit("s1")
    budgets.admit("s1")
    found = refusal(lambda: budgets.admit("s1"))
    assert (found.status, found.refused) == (429, "budget") and "request budget" in found.message
    budgets.admit("s2")


def test_a_session_past_its_token_cap_is_refused_from_its_next_call():
    budgets = Budgets(request_cap=0, token_cap=100)
    budgets.admit("s1")
    after = budgets.record("s1", Usage(60, 40), bytes_out=10, bytes_in=20)
    assert (after.input_tokens, after.output_tokens, after.requests) == (60, 40, 1)
    assert "token budget" in refusal(lambda: budgets.admit("s1")).message
    budgets.refused("s1")
    assert [u.refused for u in budgets.sessions("s1")] == [1]
    assert budgets.sessions("nobody") == [] and [u.session_id for u in budgets.sessions()] == ["s1"]


def test_a_call_that_ends_after_its_session_was_deleted_brings_no_totals_back():
    budgets = Budgets(request_cap=10, token_cap=0)
    budgets.admit("s1")
    budgets.forget("s1")  # session.deleted while the call ran
    after = budgets.record("s1", Usage(5, 6), bytes_out=1, bytes_in=2)
    assert (after.requests, after.input_tokens, after.output_tokens) == (
        0,
        5,
        6,
    )  # the call's own, for its journal
    budgets.refused("s1")
    assert budgets.sessions() == [] and budgets.take_changes() == []
    found = refusal(lambda: budgets.admit("s1"))
    assert (found.status, found.refused) == (403, "session") and "was deleted" in found.message
    budgets.admit("s2")  # the others go on


def test_budgets_hand_out_each_change_once_and_take_back_what_was_not_saved():
    budgets = Budgets(request_cap=10, token_cap=0)
    budgets.restore([SessionUsage(session_id="old", requests=4, request_cap=99, token_cap=7)])
    assert budgets.take_changes() == []  # restored totals are saved already
    (old,) = budgets.sessions("old")
    assert (old.requests, old.request_cap, old.token_cap) == (4, 10, 0)  # today's caps
    budgets.admit("s1")
    budgets.record("s1", Usage(5, 6), bytes_out=1, bytes_in=2)
    budgets.admit("old")
    changes = budgets.take_changes()
    assert [(u.session_id, u.requests, u.output_tokens) for u in changes] == [("old", 5, 0), ("s1", 1, 6)]
    assert budgets.take_changes() == []
    budgets.put_back(changes[1:])  # its save failed
    budgets.refused("s1")
    assert [(u.session_id, u.refused) for u in budgets.take_changes()] == [("s1", 1)]


def test_an_overlong_line_or_body_is_skipped_and_reading_goes_on_after_it(monkeypatch):
    from baaaht.services.credentials.egress import usage as usage_module

    monkeypatch.setattr(usage_module, "MAX_KEPT", 64)
    reader = UsageReader("text/event-stream")
    reader.feed(b'data: {"usage": {"output_tokens": 99}, "pad": "' + b"x" * 100)
    reader.feed(b'"}\ndata: {"usage": {"output_tokens": 4}}\n')
    assert reader.usage() == Usage(0, 4)


def test_the_usage_at_the_end_of_a_json_body_over_the_cap_is_read_from_that_end(monkeypatch):
    from baaaht.services.credentials.egress import usage as usage_module

    monkeypatch.setattr(usage_module, "MAX_KEPT", 64)
    monkeypatch.setattr(usage_module, "TAIL_KEPT", 80)
    quoted = b'\\"usage\\": {\\"output_tokens\\": 1}'  # a model's answer quoting a usage key
    answer = b'{"text": "' + quoted + b"x" * 200 + b'", "usage": {"output_tokens": 5, "d": {"c": 1}}, "z": 1}'
    for size in (1, 7, len(answer)):
        reader = UsageReader("application/json")
        for start in range(0, len(answer), size):
            reader.feed(answer[start : start + size])
        assert reader.usage() == Usage(0, 5), size
    only_at_the_start = UsageReader("application/json")  # past the end kept: not read
    only_at_the_start.feed(b'{"usage": {"output_tokens": 5}, "pad": "' + b"x" * 100 + b'"}')
    assert only_at_the_start.usage() == Usage(0, 0)
    # What the answer echoes after its usage (the agent's own metadata) does not hide the real one.
    monkeypatch.setattr(usage_module, "TAIL_KEPT", 160)
    echoed = answer[:-1] + b', "metadata": {"usage": "x", "n": {"usage": {"output_tokens": 2}}}}'
    reader = UsageReader("application/json")
    reader.feed(echoed)
    assert reader.usage() == Usage(0, 5)


@pytest.mark.parametrize(
    "kind, value, injected_value, forms",
    [
        ("api_key", b"sk-abc123", "sk-abc123", [b"sk-abc123", base64.b64encode(b"sk-abc123")]),
        ("api_key", b"sk-abc123", "Bearer sk-abc123", [b"Bearer sk-abc123"]),
        ("basic", b"user:hunter22", "Basic " + base64.b64encode(b"user:hunter22").decode(), [b"hunter22"]),
        ("basic", b"user:pw", "Basic " + base64.b64encode(b"user:pw").decode(), [b"user:pw"]),
    ],
)
def test_the_forms_an_echo_of_a_key_could_take(kind, value, injected_value, forms):
    found = echo_forms(kind, value, injected_value)
    assert set(forms) <= set(found) and value in found and injected_value.encode() in found
    assert b"pw" not in found  # a fragment under MIN_FORM bytes would redact ordinary text
    assert [len(form) for form in found] == sorted((len(form) for form in found), reverse=True)


def test_scrubbing_replaces_every_form_in_bodies_and_headers():
    forms = echo_forms("api_key", b"sk-abc123", "Bearer sk-abc123")
    body = b'{"message": "bad key Bearer sk-abc123 (sk-abc123, c2stYWJjMTIz)"}'
    scrubbed = scrub(body, forms)
    assert b"sk-abc123" not in scrubbed and b"c2stYWJjMTIz" not in scrubbed
    assert scrubbed.count(REDACTED) == 3
    headers = scrub_headers([("WWW-Authenticate", 'Bearer key="sk-abc123"'), ("X-Other", "kept")], forms)
    assert headers == [("WWW-Authenticate", f'Bearer key="{REDACTED.decode()}"'), ("X-Other", "kept")]
    assert scrub(b"nothing to see", forms) == b"nothing to see"


# -- journal ---------------------------------------------------------------------------------------


def test_calls_ending_while_the_journal_writes_are_written_next_as_one_batch():
    import threading

    from baaaht.services.credentials.egress.journal import Call, Journal

    class Audit:
        path = "audit.jsonl"

        def __init__(self):
            self.batches: list[list[str]] = []

        def append_all(self, records):
            self.batches.append([r.path for r in records])

    class Events:
        def __init__(self):
            self.published: list[str] = []
            self.first_taken = threading.Event()
            self.go_on = threading.Event()

        def publish(self, event, subtopic: str = "") -> None:
            self.first_taken.set()
            assert self.go_on.wait(10)
            self.published.append(event.path)

    audit, events = Audit(), Events()
    journal = Journal(audit, events)
    call = lambda n: Call(started=0.0, started_at=0.0, method="GET", path=f"/{n}", refused="identity")  # noqa: E731
    journal.record(call(1))
    assert events.first_taken.wait(10)  # the worker is busy with the first call
    for n in (2, 3, 4):
        journal.record(call(n))
    events.go_on.set()
    journal.close()
    assert audit.batches == [["/1"], ["/2", "/3", "/4"]]
    assert events.published == ["/1", "/2", "/3", "/4"]


# -- callers ---------------------------------------------------------------------------------------


def test_an_identity_is_read_again_only_when_its_file_changed_and_a_revoked_one_is_refused_at_once(tmp_path):
    from baaaht.common.identity import IdentityStore
    from baaaht.services.credentials.egress.callers import HostCallers

    callers = HostCallers(str(tmp_path))
    store = IdentityStore(str(tmp_path))
    reads = []
    real_get = callers.store.get
    callers.store.get = lambda container_id: (reads.append(container_id), real_get(container_id))[1]
    container = "a" * 64
    assert callers.identity(container) is None and reads == []  # no file: nothing to read
    store.put(who(session="s1"))
    assert callers.identity(container).session_id == "s1"
    assert callers.identity(container).session_id == "s1" and len(reads) == 1
    store.put(who(session="s2"))  # a new identity file for the same container
    assert callers.identity(container).session_id == "s2" and len(reads) == 2
    store.remove(container)
    assert callers.identity(container) is None
    assert callers.identity("../" + "a" * 61) is None


class NoPidfd(socket.socket):
    """A socket of a kernel before 6.5: SO_PEERPIDFD is unknown to it."""

    def getsockopt(self, level, option, *size):
        if option == egress_callers.SO_PEERPIDFD:
            raise OSError(errno.ENOPROTOOPT, "Protocol not available")
        return super().getsockopt(level, option, *size)


class OneCaller:
    def container_of(self, pid: int) -> str | None:
        return "c1"

    def identity(self, container_id: str):
        return None


def test_without_pidfds_a_caller_is_judged_by_its_pid_and_the_operator_is_warned_once(caplog):
    egress_callers._warn_pid_alone.cache_clear()
    left, right = socket.socketpair()
    sock = NoPidfd(fileno=left.detach())
    try:
        with caplog.at_level(logging.WARNING, logger="baaaht.egress"):
            assert [egress_callers.container_of_peer(OneCaller(), sock) for _ in range(2)] == ["c1", "c1"]
        assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
        assert "SO_PEERPIDFD" in caplog.records[0].message
    finally:
        sock.close()
        right.close()


def test_a_failed_summing_up_of_refusals_is_logged_and_the_next_period_sums_up_again(caplog):
    class Proxy:
        calls = 0

        def _sum_up_refusals(self):
            self.calls += 1
            if self.calls == 1:
                raise OSError("the journal is closed")

    async def three_periods(proxy):
        summing = asyncio.ensure_future(EgressProxy._sum_up_refusals_every(proxy, 0.001))
        while proxy.calls < 3:
            await asyncio.sleep(0.001)
        summing.cancel()

    proxy = Proxy()
    with caplog.at_level(logging.ERROR, logger="baaaht.egress"):
        asyncio.run(asyncio.wait_for(three_periods(proxy), 10))
    assert proxy.calls >= 3 and "summing up the refused calls failed" in caplog.text
