"""The egress proxy on a real unix socket, in front of the fake TLS upstream, from this process.

The caller's container is this process (tests/egress_support.py `OwnPid`); the real pid -> container
lookup runs from a real agent container in tests/test_egress_container.py.
"""

from __future__ import annotations

import array
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import msgspec
import pytest
import uvloop

from baaaht.bus.errors import not_found
from baaaht.bus.testing import FakeBus, ServiceHarness, wait_for
from baaaht.common import audit_chain
from baaaht.schemas.config import Config
from baaaht.schemas.egress import CredentialUsage, EgressAuditRecord, EgressProxied, EgressRefused
from baaaht.schemas.sessions import SessionDeleted, SessionGet
from baaaht.services.credentials.egress.journal import audit_path
from baaaht.services.credentials.egress.proxy import MAX_ERROR_BODY
from baaaht.services.credentials.egress.usage_store import UsageStore, usage_path
from baaaht.services.credentials.master import KeyFile
from baaaht.services.credentials.service import CredentialService
from baaaht.services.credentials.store import CredentialStore
from tests.egress_agent_client import run as run_sdks
from tests.egress_support import ANTHROPIC_KEY, CONTAINER, OPENAI_KEY, SESSION, running_egress
from tests.sqlite_faults import FailingCommit

MESSAGE = {"model": "claude-fake", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
CHAT = {"model": "gpt-fake", "messages": [{"role": "user", "content": "hi"}]}


def refused_as(response: httpx.Response) -> str:
    assert response.headers["content-type"].startswith("application/json")
    return msgspec.json.decode(response.content)["error"]["refused"]


def audit_records(egress) -> list[EgressAuditRecord]:
    egress.server.journal.close()  # everything recorded is written
    path = audit_path(egress.data_dir)
    assert audit_chain.verify(path).ok
    return audit_chain.read_tail(path, 1000, 0, EgressAuditRecord)[0]


def test_the_proxy_serves_on_uvloop_and_still_knows_its_caller_by_peer_credentials(tmp_path):
    with running_egress(tmp_path) as egress, egress.client() as client:
        assert isinstance(egress.server._loop, uvloop.Loop)
        assert client.get("/anthropic/v1/models").status_code == 200


def test_the_key_reaches_the_upstream_in_its_header_and_the_agents_own_are_dropped(tmp_path):
    with running_egress(tmp_path) as egress, egress.client() as client:
        sent = {
            "x-api-key": "agent-made",
            "authorization": "Bearer agent-made",
            "anthropic-version": "2023-06-01",
        }
        reply = client.post("/anthropic/v1/messages", json=MESSAGE, headers=sent)
        assert reply.status_code == 200 and reply.json()["usage"] == {"input_tokens": 12, "output_tokens": 10}
        chat = client.post("/openai/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer mine"})
        assert chat.status_code == 200
        anthropic_seen, openai_seen = egress.upstream.requests
        assert anthropic_seen.headers["x-api-key"] == ANTHROPIC_KEY.decode()
        assert "authorization" not in anthropic_seen.headers
        assert anthropic_seen.headers["anthropic-version"] == "2023-06-01"
        assert openai_seen.headers["authorization"] == f"Bearer {OPENAI_KEY.decode()}"
        assert anthropic_seen.path == "/v1/messages"
        for form in egress.secret_forms():
            assert form not in reply.content and form not in chat.content
            assert all(form.decode() not in value for value in reply.headers.values())
        assert egress.secrets.used == ["anthropic", "openai"]


def test_calls_are_audited_in_a_verifiable_chain_and_published_without_any_secret(tmp_path):
    with running_egress(tmp_path) as egress, egress.client() as client:
        client.post("/anthropic/v1/messages", json={**MESSAGE, "stream": True})
        client.post("/anthropic/v1/nothing", json=MESSAGE)
        records = audit_records(egress)
        proxied, refused = records
        assert (proxied.container_id, proxied.session_id, proxied.role, proxied.route) == (
            CONTAINER,
            SESSION,
            "agent",
            "anthropic",
        )
        assert (proxied.method, proxied.path, proxied.status, proxied.refused) == (
            "POST",
            "/anthropic/v1/messages",
            200,
            "",
        )
        assert proxied.host == egress.upstream.url.removeprefix("https://")
        assert (proxied.input_tokens, proxied.output_tokens) == (12, 10)
        assert proxied.bytes_out > 0 and proxied.bytes_in > 0 and proxied.duration > 0
        assert (refused.status, refused.refused, refused.bytes_out) == (403, "path", 0)
        events = egress.events.wait_for_events(count=2)
        assert [type(e) for e in events] == [EgressProxied, EgressRefused]
        assert events[0].usage.input_tokens == 12 and events[0].usage.requests == 1
        written = audit_path(egress.data_dir).read_bytes() + msgspec.json.encode(events)
        for form in egress.secret_forms():
            assert form not in written


@pytest.mark.parametrize(
    "method, path, role, body, refused",
    [
        ("POST", "/nothing/v1/messages", "agent", MESSAGE, "route"),
        ("DELETE", "/anthropic/v1/messages", "agent", None, "method"),
        ("POST", "/anthropic/v1/complete", "agent", MESSAGE, "path"),
        ("POST", "/anthropic/v1/organizations/api_keys", "agent", MESSAGE, "path"),
        ("POST", "/anthropic/v1/messages/batches", "agent", {"requests": [{"custom_id": "1"}]}, "path"),
        ("POST", "/other-session/v1/messages", "agent", MESSAGE, "session"),
        ("POST", "/workers/v1/messages", "agent", MESSAGE, "role"),
        ("POST", "/anthropic/v1/messages", "worker", MESSAGE, "role"),
        ("POST", "/expired/v1/messages", "agent", MESSAGE, "credential"),
    ],
)
def test_each_refusal_has_a_clear_body_and_nothing_reaches_the_upstream(
    tmp_path, method, path, role, body, refused
):
    with running_egress(tmp_path, role=role) as egress, egress.client() as client:
        reply = client.request(method, path, json=body)
        assert reply.status_code in (403, 404, 405) and refused_as(reply) == refused
        assert egress.upstream.requests == []
        assert [r.refused for r in audit_records(egress)] == [refused]


def raw_post(socket_path: str, target: str) -> tuple[int, bytes]:
    """A POST whose request target goes out byte for byte (an HTTP client may normalize its escapes)."""
    body = b"{}"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(socket_path)
        sock.sendall(
            f"POST {target} HTTP/1.1\r\nHost: egress\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, content = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), content


def test_a_double_encoded_character_does_not_take_a_call_past_the_deny_paths(tmp_path):
    # The route allows /v1/messages and below. The server decodes %2561 to %61, which the upstream
    # client would send as `a`: the upstream would read the denied /v1/messages/batches.
    with running_egress(tmp_path, deny_paths=["/v1/messages/batches"]) as egress:
        status, content = raw_post(egress.socket_path, "/anthropic/v1/messages/b%2561tches")
        assert (status, msgspec.json.decode(content)["error"]["refused"]) == (400, "path")
        assert egress.upstream.requests == []


def test_a_connection_without_an_identity_is_refused_and_so_is_one_whose_identity_was_revoked(tmp_path):
    with running_egress(tmp_path) as egress:
        with egress.client() as client:
            assert client.post("/anthropic/v1/messages", json=MESSAGE).status_code == 200
            egress.callers.store.remove(CONTAINER)  # the container manager revoked it
            reply = client.post("/anthropic/v1/messages", json=MESSAGE)  # same connection
            assert reply.status_code == 403 and refused_as(reply) == "identity"
        egress.callers.inside = False
        with egress.client() as client:
            assert refused_as(client.post("/anthropic/v1/messages", json=MESSAGE)) == "identity"
        assert len(egress.upstream.requests) == 1


CONNECT_AND_HAND_OVER = """
import array, socket, sys
conn = socket.socket(socket.AF_UNIX)
conn.connect(sys.argv[1])
back = socket.socket(fileno=int(sys.argv[2]))
back.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [conn.fileno()]))])
"""


def connection_of_a_process_that_exited(socket_path: str) -> socket.socket:
    """A connection to `socket_path` made by a child process, handed over to this one; the child is gone."""
    mine, theirs = socket.socketpair()
    with mine, theirs:
        child = subprocess.run(
            [sys.executable, "-c", CONNECT_AND_HAND_OVER, socket_path, str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            timeout=30,
        )
        assert child.returncode == 0
        fds = array.array("i")
        _, ancillary, _, _ = mine.recvmsg(1, socket.CMSG_SPACE(fds.itemsize))
        fds.frombytes(ancillary[0][2][: fds.itemsize])
    return socket.socket(fileno=fds[0])


def test_a_connection_whose_process_exited_is_not_taken_for_whoever_has_its_pid_now(tmp_path):
    # Its pid may be another container's process by now (pid_max can be 32768): the calls on it would be
    # that container's, its session's routes and budget.
    with running_egress(tmp_path) as egress:
        egress.callers.container_of = lambda pid: CONTAINER  # every pid: a process of that container now
        with connection_of_a_process_that_exited(egress.socket_path) as conn:
            conn.settimeout(10)
            conn.sendall(b"GET /anthropic/v1/models HTTP/1.1\r\nHost: egress\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := conn.recv(65536):
                answer += chunk
        assert answer.split()[1] == b"403" and b'"identity"' in answer
        assert egress.upstream.requests == []


def test_the_container_is_looked_up_once_per_connection_not_per_call(tmp_path):
    with running_egress(tmp_path) as egress, egress.client() as client:
        for _ in range(3):
            assert client.get("/anthropic/v1/models").status_code == 200
        assert egress.callers.looked_up == 1


def test_oversized_request_bodies_are_refused_before_anything_is_forwarded(tmp_path):
    with running_egress(tmp_path, max_request_size=1000) as egress, egress.client() as client:
        declared = client.post("/anthropic/v1/messages", content=b"x" * 1001)
        assert declared.status_code == 413 and refused_as(declared) == "size"
        chunked = client.post("/anthropic/v1/messages", content=iter([b"x" * 600, b"x" * 600]))
        assert chunked.status_code == 413 and refused_as(chunked) == "size"
        assert client.post("/anthropic/v1/messages", json=MESSAGE).status_code == 200
        assert len(egress.upstream.requests) == 1


def test_an_oversized_response_is_refused(tmp_path):
    with running_egress(tmp_path, max_response_size=1000) as egress, egress.client() as client:
        assert client.get("/anthropic/bytes?size=1000").status_code == 200
        reply = client.get("/anthropic/bytes?size=1001")
        assert reply.status_code == 502 and refused_as(reply) == "size"


def test_a_redirect_to_another_host_is_refused_and_one_home_is_handed_back_through_the_proxy(tmp_path):
    with running_egress(tmp_path) as egress, egress.client() as client:
        away = client.get("/anthropic/redirect/away")
        assert away.status_code == 502 and refused_as(away) == "redirect"
        assert "elsewhere" not in away.text
        home = client.get("/anthropic/redirect/home")
        assert home.status_code == 302 and home.headers["location"] == "/anthropic/v1/models"
        assert [r.path for r in egress.upstream.requests] == ["/redirect/away", "/redirect/home"]
        assert client.get(home.headers["location"]).json()["data"][0]["id"] == "fake-model"


def test_budgets_refuse_429_naming_the_budget(tmp_path):
    with running_egress(tmp_path, session_requests=2) as egress, egress.client() as client:
        for _ in range(2):
            assert client.post("/anthropic/v1/messages", json=MESSAGE).status_code == 200
        reply = client.post("/anthropic/v1/messages", json=MESSAGE)
        assert reply.status_code == 429 and refused_as(reply) == "budget"
        assert "request budget" in reply.json()["error"]["message"]
        assert len(egress.upstream.requests) == 2
    with running_egress(tmp_path / "tokens", session_tokens=30) as egress, egress.client() as client:
        streamed = client.post("/anthropic/v1/messages", json={**MESSAGE, "stream": True})
        assert streamed.status_code == 200  # 22 tokens, read from the stream
        assert client.post("/openai/v1/chat/completions", json={**CHAT, "stream": True}).status_code == 200
        reply = client.post("/anthropic/v1/messages", json=MESSAGE)
        assert reply.status_code == 429 and "token budget" in reply.json()["error"]["message"]
        (usage,) = egress.server.usage(CredentialUsage()).sessions
        assert (usage.requests, usage.refused, usage.input_tokens, usage.output_tokens) == (2, 1, 24, 20)
        assert egress.server.usage(CredentialUsage(session_id="s9")).sessions == []


def test_the_tokens_of_a_json_answer_too_big_to_keep_whole_count_against_the_budget(tmp_path):
    # Over usage.MAX_KEPT (4 MiB; an agent asks for logprobs or many choices): its usage, the last key,
    # was never read, and the session's calls passed egress.session_tokens without end.
    with running_egress(tmp_path, session_tokens=30) as egress, egress.client(timeout=30) as client:
        egress.upstream.reply = "word " * (1024 * 1024)
        assert client.post("/anthropic/v1/messages", json=MESSAGE).status_code == 200
        (usage,) = egress.server.usage(CredentialUsage()).sessions
        assert usage.output_tokens > 1_000_000
        reply = client.post("/anthropic/v1/messages", json=MESSAGE)
        assert reply.status_code == 429 and "token budget" in reply.json()["error"]["message"]


def saved_usage(path) -> list:
    """The totals on disk, read by another connection (as the next process would)."""
    store = UsageStore(path)
    try:
        return store.load()
    finally:
        store.close()


def test_a_usage_save_whose_commit_fails_with_its_transaction_left_open_does_not_stop_the_next(tmp_path):
    """Left open, every later save failed (BEGIN within a transaction) and no total was kept again."""
    from baaaht.schemas.egress import SessionUsage

    path = usage_path(tmp_path)
    store = UsageStore(path)
    try:
        db = store._db = FailingCommit(store._db)
        db.fail_next = True
        with pytest.raises(Exception, match="full"):
            store.save([SessionUsage(session_id="s1", requests=1)])
        store.save([SessionUsage(session_id="s1", requests=2)])
    finally:
        store.close()
    assert [(u.session_id, u.requests) for u in saved_usage(path)] == [("s1", 2)]


def test_budgets_survive_a_restart_of_the_proxy(tmp_path):
    with (
        running_egress(tmp_path, session_requests=3, session_tokens=1000) as egress,
        egress.client() as client,
    ):
        for _ in range(2):
            assert client.post("/anthropic/v1/messages", json=MESSAGE).status_code == 200
        # what a kill -9 now would leave: the saver's last batch, committed without any stop
        saved = usage_path(egress.data_dir)
        wait_for(
            lambda: [u.requests for u in saved_usage(saved)] == [2],
            timeout=10,
            what="the usage to be saved within its interval",
        )
        before = egress.server.usage(CredentialUsage(session_id=SESSION)).sessions
    with (
        running_egress(tmp_path, session_requests=3, session_tokens=1000) as egress,
        egress.client() as client,
    ):
        assert egress.server.usage(CredentialUsage(session_id=SESSION)).sessions == before
        assert client.post("/anthropic/v1/messages", json=MESSAGE).status_code == 200
        reply = client.post("/anthropic/v1/messages", json=MESSAGE)
        assert reply.status_code == 429 and "3 of 3 calls" in reply.json()["error"]["message"]
        (usage,) = egress.server.usage(CredentialUsage(session_id=SESSION)).sessions
        assert (usage.requests, usage.refused, usage.output_tokens) == (
            3,
            1,
            3 * len(egress.upstream.reply.split()),
        )
    with running_egress(tmp_path, session_requests=5) as egress:  # the caps are today's configuration
        (usage,) = egress.server.usage(CredentialUsage(session_id=SESSION)).sessions
        assert (usage.requests, usage.request_cap, usage.token_cap) == (3, 5, 0)


def test_a_deleted_sessions_usage_goes_with_it_from_memory_and_from_the_file(tmp_path):
    """session.deleted reaches the credential service: the session's totals and its row go, a change
    not yet saved is not written back, and a restart does not bring it back."""
    store = CredentialStore.open(str(tmp_path / "creds"), KeyFile(str(tmp_path / "keys" / "m.key")))
    try:
        with running_egress(tmp_path) as egress, egress.client() as client:
            harness = ServiceHarness(CredentialService, store, Config(), egress=lambda secrets: egress.server)
            assert client.post("/anthropic/v1/messages", json=MESSAGE).status_code == 200
            saved = usage_path(egress.data_dir)
            egress.server.saver.save()
            assert [u.session_id for u in saved_usage(saved)] == [SESSION]
            assert client.post("/anthropic/v1/messages", json=MESSAGE).status_code == 200  # not saved yet
            assert harness.deliver(SessionDeleted(session_id=SESSION, owner="alice")) == 1
            assert egress.server.usage(CredentialUsage()).sessions == []
            egress.server.saver.save()
            assert saved_usage(saved) == []
        with running_egress(tmp_path) as egress:
            assert egress.server.usage(CredentialUsage()).sessions == []
    finally:
        store.close()


def test_usage_of_a_session_deleted_while_the_service_was_down_is_pruned_once_sessions_answers(tmp_path):
    store = CredentialStore.open(str(tmp_path / "creds"), KeyFile(str(tmp_path / "keys" / "m.key")))
    try:
        with running_egress(tmp_path) as egress, egress.client() as client:
            assert client.post("/anthropic/v1/messages", json=MESSAGE).status_code == 200
        bus = FakeBus()
        with running_egress(tmp_path) as egress:  # restarted: the session was deleted meanwhile
            harness = ServiceHarness(
                CredentialService, store, Config(), bus=bus, egress=lambda s: egress.server
            )
            harness.service.prune_deleted_sessions()  # the session service is not there yet: kept
            assert [u.session_id for u in egress.server.usage(CredentialUsage()).sessions] == [SESSION]
            bus.answer(SessionGet, not_found(f"no session {SESSION}", session_id=SESSION))
            harness.service.prune_deleted_sessions()
            assert egress.server.usage(CredentialUsage()).sessions == []
            assert [r.session_id for r in bus.requests(SessionGet)] == [SESSION, SESSION]
            harness.service.prune_deleted_sessions()  # asked once: no more calls
            assert len(bus.requests(SessionGet)) == 2
        assert saved_usage(usage_path(egress.data_dir)) == []
    finally:
        store.close()


# Run in a child process: a proxy that makes CALLS calls to itself (OwnPid: its own pid is the agent),
# waits until they are saved, says so (and where its run directory is, for the parent to remove) and waits
# to be killed.
_CALLS_THEN_WAIT = """
import sys, time
from pathlib import Path
from baaaht.bus.testing import wait_for
from tests.egress_support import running_egress
from tests.test_egress_proxy import MESSAGE, saved_usage
from baaaht.services.credentials.egress.usage_store import usage_path

tmp_path, calls = Path(sys.argv[1]), int(sys.argv[2])
with running_egress(tmp_path) as egress, egress.client() as client:
    for _ in range(calls):
        assert client.post("/anthropic/v1/messages", json=MESSAGE).status_code == 200
    wait_for(lambda: [u.requests for u in saved_usage(usage_path(egress.data_dir))] == [calls], timeout=10)
    print("saved", egress.run_dir, flush=True)
    time.sleep(600)
"""


def test_a_kill_9_after_a_save_loses_no_counted_call(tmp_path):
    calls = 4
    child = subprocess.Popen(
        [sys.executable, "-c", _CALLS_THEN_WAIT, str(tmp_path), str(calls)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    said = []
    try:
        said = child.stdout.readline().split()
        assert said[:1] == ["saved"]
    finally:
        child.kill()  # SIGKILL: no stop, no last save
        child.wait(30)
        child.stdout.close()
        if len(said) == 2:
            shutil.rmtree(said[1], ignore_errors=True)
    with running_egress(tmp_path) as egress:
        (usage,) = egress.server.usage(CredentialUsage(session_id=SESSION)).sessions
        assert usage.requests == calls and usage.output_tokens == calls * len(egress.upstream.reply.split())


def test_openai_streams_report_usage_because_the_proxy_asks_for_it(tmp_path):
    with running_egress(tmp_path) as egress, egress.client() as client:
        reply = client.post("/openai/v1/chat/completions", json={**CHAT, "stream": True})
        assert b'"usage"' in reply.content
        asked = msgspec.json.decode(egress.upstream.requests[0].body)
        assert asked["stream_options"] == {"include_usage": True}
        (usage,) = egress.server.usage(CredentialUsage(session_id=SESSION)).sessions
        assert (usage.input_tokens, usage.output_tokens) == (12, 10)


def test_streams_arrive_chunk_by_chunk_as_the_upstream_writes_them(tmp_path):
    interval = 0.15
    with running_egress(tmp_path) as egress, egress.client() as client:
        egress.upstream.chunk_interval = interval
        egress.upstream.reply = "one two three four"
        arrivals = []
        with client.stream("POST", "/anthropic/v1/messages", json={**MESSAGE, "stream": True}) as reply:
            assert reply.headers["x-accel-buffering"] == "no"
            assert reply.headers["content-type"] == "text/event-stream"
            for line in reply.iter_lines():
                if line.startswith("event: content_block_delta"):
                    arrivals.append(time.monotonic())
        gaps = [later - earlier for earlier, later in zip(arrivals, arrivals[1:], strict=False)]
        assert len(arrivals) == 4 and all(gap > interval * 0.5 for gap in gaps), gaps


def test_an_agent_that_goes_away_cancels_the_upstream_call(tmp_path):
    with running_egress(tmp_path) as egress:
        egress.upstream.chunk_interval = 0.5
        egress.upstream.reply = " ".join(["word"] * 100)  # 50 s if nobody stops it
        with egress.client() as client:
            with client.stream("POST", "/anthropic/v1/messages", json={**MESSAGE, "stream": True}) as reply:
                next(reply.iter_raw())
        assert egress.upstream.abandoned.wait(10), "the upstream stream went on after the agent left"
        (record,) = audit_records(egress)
        assert record.status == 499


def test_an_untrusted_upstream_certificate_is_refused(tmp_path):
    with running_egress(tmp_path, ca_file="") as egress, egress.client() as client:
        reply = client.post("/anthropic/v1/messages", json=MESSAGE)
        assert reply.status_code == 502 and refused_as(reply) == "upstream"
        assert "not trusted" in reply.json()["error"]["message"]
        assert egress.upstream.requests == []


def test_the_stock_anthropic_and_openai_sdks_work_through_the_proxy(tmp_path):
    with running_egress(tmp_path) as egress:
        found = run_sdks(egress.socket_path)
        reply = egress.upstream.reply
        for api in ("anthropic", "anthropic_stream", "openai", "openai_stream"):
            assert found[api] == {"text": reply, "output_tokens": len(reply.split(" "))}, api
        assert found["refused"]["status"] == 405
        assert found["refused"]["body"]["error"]["refused"] == "method"
        keys = [
            r.headers.get("x-api-key") or r.headers.get("authorization") for r in egress.upstream.requests
        ]
        anthropic_key, openai_key = ANTHROPIC_KEY.decode(), f"Bearer {OPENAI_KEY.decode()}"
        assert keys == [anthropic_key] * 2 + [openai_key] * 2 + [anthropic_key] * 2
        assert found["httpx_stream"] == found["http_client"] == {"status": 200, "text": reply}


def leaks(response: httpx.Response, egress) -> int:
    seen = response.content + repr(list(response.headers.items())).encode()
    return sum(seen.count(form) for form in egress.secret_forms())


def test_an_upstream_error_quoting_the_key_reaches_the_agent_with_the_key_redacted(tmp_path):
    with running_egress(tmp_path) as egress, egress.client() as client:
        egress.upstream.reject_key = True
        for path, body in (("/anthropic/v1/messages", MESSAGE), ("/openai/v1/chat/completions", CHAT)):
            reply = client.post(path, json=body)
            assert reply.status_code == 401
            sent = egress.upstream.requests[-1].headers
            assert any(form.decode() in str(sent) for form in egress.secret_forms())  # the key went upstream
            assert leaks(reply, egress) == 0, reply.content
            message = reply.json()["error"]["message"]
            assert message.startswith("invalid credential: ") and "[redacted by the egress proxy]" in message
            assert "[redacted by the egress proxy]" in reply.headers["www-authenticate"]
            assert int(reply.headers["content-length"]) == len(reply.content)


def test_an_encoded_upstream_error_is_withheld_since_it_cannot_be_searched(tmp_path):
    with running_egress(tmp_path) as egress, egress.client() as client:
        egress.upstream.reject_key, egress.upstream.reject_encoding = True, "gzip"
        reply = client.post("/anthropic/v1/messages", json=MESSAGE)
        assert reply.status_code == 401 and "content-encoding" not in reply.headers
        assert reply.text.startswith("the upstream's error body was gzip-encoded and is withheld")
        assert leaks(reply, egress) == 0


def test_a_key_across_the_cut_of_an_overlong_error_body_is_redacted_not_halved(tmp_path):
    before_key = b'{"type":"error","error":{"type":"authentication_error","message":"invalid credential: '
    with running_egress(tmp_path) as egress, egress.client() as client:
        egress.upstream.reject_key = True
        egress.upstream.reject_padding = MAX_ERROR_BODY - 5 - len(before_key)  # the key starts 5 bytes before
        reply = client.post("/anthropic/v1/messages", json=MESSAGE)
        assert reply.status_code == 401 and len(reply.content) == MAX_ERROR_BODY
        assert ANTHROPIC_KEY[:5] not in reply.content[-50:] and reply.content.endswith(b"[reda")
        assert leaks(reply, egress) == 0
