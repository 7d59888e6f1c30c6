"""The fetch tool against a stand-in egress proxy on a unix socket: only the proxy's base URL is taken,
the request reaches the socket as sent, the body is capped, failures are errors with a code."""

from __future__ import annotations

import http.server
import socketserver
import threading

import pytest

from baaaht.agent.tools.errors import ToolError
from baaaht.agent.tools.fetch import fetch
from baaaht.schemas.errors import ErrorCode
from baaaht.schemas.tools import ToolFetch


class _Handler(http.server.BaseHTTPRequestHandler):
    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length)
        self.server.seen.append(
            (self.command, self.path, self.headers.get("host"), self.headers.get("x-test"), body)
        )
        reply = b"R" * 5000 if self.path.startswith("/big/") else b"ok:" + body
        self.send_response(201)
        self.send_header("content-length", str(len(reply)))
        self.send_header("X-Proxy", "stand-in")
        self.end_headers()
        self.wfile.write(reply)

    do_GET = do_POST = _answer

    def log_message(self, *args) -> None:
        pass


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def get_request(self):
        request, _ = super().get_request()
        return request, ("egress-peer", 0)


@pytest.fixture
def proxy(tmp_path):
    path = str(tmp_path / "egress.sock")
    server = _Server(path, _Handler)
    server.seen = []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield path, server
    server.shutdown()
    server.server_close()
    thread.join(10)


def test_a_call_reaches_the_proxy_as_sent(proxy):
    path, server = proxy
    got = fetch(
        path,
        ToolFetch(url="http://egress/api/v1/items?q=1", method="POST", body="hi", headers={"X-Test": "yes"}),
    )
    assert (got.status, got.body, got.truncated, got.headers["x-proxy"]) == (201, "ok:hi", False, "stand-in")
    assert server.seen == [("POST", "/api/v1/items?q=1", "egress", "yes", b"hi")]


def test_the_body_is_capped(proxy):
    got = fetch(proxy[0], ToolFetch(url="http://egress/big/x", max_bytes=100))
    assert got.truncated and got.body == "R" * 100


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/",
        "http://example.com/egress/",
        "http://egress.evil/x",
        "file:///etc/passwd",
        "egress/x",
    ],
)
def test_anything_but_the_proxy_is_refused_before_sending(proxy, url):
    with pytest.raises(ToolError) as caught:
        fetch(proxy[0], ToolFetch(url=url))
    assert caught.value.code == ErrorCode.PERMISSION_DENIED and "egress proxy" in caught.value.message
    assert proxy[1].seen == []


@pytest.mark.parametrize("url", ["http://egress/", "http://egress/x#frag"])
def test_a_proxy_url_without_a_route_or_with_extras_is_refused(proxy, url):
    with pytest.raises(ToolError) as caught:
        fetch(proxy[0], ToolFetch(url=url))
    assert caught.value.code == ErrorCode.INVALID_ARGUMENT


def test_no_proxy_listening_is_unavailable(tmp_path):
    with pytest.raises(ToolError) as caught:
        fetch(str(tmp_path / "none.sock"), ToolFetch(url="http://egress/api/x"))
    assert caught.value.code == ErrorCode.UNAVAILABLE and "not listening" in caught.value.message
