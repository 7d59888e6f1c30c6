"""A fake LLM upstream over TLS on 127.0.0.1, for tests and benchmarks that must stay offline.

It speaks the Anthropic Messages (`POST /v1/messages`) and OpenAI chat-completions
(`POST /v1/chat/completions`) shapes, streamed (Server-Sent Events, one chunk per word, with the
usage both APIs report) and not, behind a certificate of a test CA made with `cryptography`
(`ca_file`, to trust through `egress.ca_file`). It records every request it got (method, path,
headers, body) and every stream whose reader went away, and answers a few paths tests need:
`/redirect/away` (302 to another origin), `/redirect/home` (302 to its own `/v1/models`),
`/v1/models`, `/bytes?size=N[&chunk=M]` (N bytes, streamed M at a time when M is given). With
`reject_key` set it answers every call 401 quoting the key it got, in the body and a header, as some
APIs do (gzip-encoded when `reject_encoding` is "gzip").

    with FakeLLM(tmp_path) as upstream:        # in a thread of this process
        upstream.url, upstream.ca_file, upstream.requests

    python -m baaaht.bus.testing.fake_llm DIR  # its own process: prints the URL, runs until stdin ends
"""

from __future__ import annotations

import asyncio
import datetime
import gzip
import ipaddress
import ssl
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

START_TIMEOUT = 10.0
DEFAULT_REPLY = "Hello from the fake model, one word at a time."
INPUT_TOKENS = 12  # what every request reports as its input


@dataclass(frozen=True)
class TestCA:
    ca_file: Path  # the CA certificate (PEM): what a client trusts
    cert_file: Path  # the server's chain for 127.0.0.1 and localhost
    key_file: Path


def make_test_ca(directory: str | Path) -> TestCA:
    """A CA and a server certificate for 127.0.0.1/localhost it signed, valid for a day."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "baaaht test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    found = TestCA(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    found.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    found.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    found.key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    found.key_file.chmod(0o600)
    return found


@dataclass(frozen=True)
class SeenRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    at: float  # time.monotonic() when it arrived


@dataclass
class FakeLLM:
    """The fake upstream, served from a thread with its own event loop."""

    directory: str | Path
    reply: str = DEFAULT_REPLY
    chunk_interval: float = 0.0  # seconds between streamed chunks
    first_byte_delay: float = 0.0  # seconds before a response starts
    requests: list[SeenRequest] = field(default_factory=list)
    abandoned: threading.Event = field(default_factory=threading.Event)  # a stream's reader went away
    reject_key: bool = False  # answer 401, quoting the credential headers
    reject_encoding: str = ""  # "gzip": that 401's body compressed
    url: str = ""
    ca: TestCA | None = None

    @property
    def ca_file(self) -> str:
        assert self.ca is not None, "start the fake first"
        return str(self.ca.ca_file)

    def __enter__(self) -> "FakeLLM":
        self.ca = make_test_ca(self.directory)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.ca.cert_file, self.ca.key_file)
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()

        async def serve() -> None:
            self._runner = web.AppRunner(self.app(), access_log=None, handler_cancellation=True)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=context)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]
            self.url = f"https://127.0.0.1:{port}"

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(serve())
            ready.set()
            self._loop.run_forever()
            self._loop.run_until_complete(self._runner.cleanup())
            self._loop.close()

        self._thread = threading.Thread(target=run, name="fake-llm", daemon=True)
        self._thread.start()
        if not ready.wait(START_TIMEOUT):
            raise RuntimeError(f"the fake LLM did not start within {START_TIMEOUT:.0f}s")
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(START_TIMEOUT)

    # -- the API --------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1024**3)
        app.router.add_post("/v1/messages", self.anthropic)
        app.router.add_post("/v1/chat/completions", self.openai)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/redirect/away", self.redirect_away)
        app.router.add_get("/redirect/home", self.redirect_home)
        app.router.add_get("/bytes", self.some_bytes)
        app.middlewares.append(self._record)
        return app

    @web.middleware
    async def _record(self, request: web.Request, handler) -> web.StreamResponse:
        body = await request.read()
        headers = {name.lower(): value for name, value in request.headers.items()}
        self.requests.append(SeenRequest(request.method, request.path_qs, headers, body, time.monotonic()))
        if self.first_byte_delay:
            await asyncio.sleep(self.first_byte_delay)
        if self.reject_key:
            return self._rejected(headers)
        return await handler(request)

    def _rejected(self, headers: dict[str, str]) -> web.Response:
        quoted = headers.get("x-api-key") or headers.get("authorization", "")
        body = msgspec.json.encode(
            {
                "type": "error",
                "error": {"type": "authentication_error", "message": f"invalid credential: {quoted}"},
            }
        )
        extra = {}
        if self.reject_encoding == "gzip":
            body, extra = gzip.compress(body), {"Content-Encoding": "gzip"}
        return web.Response(
            status=401,
            body=body,
            content_type="application/json",
            headers={"WWW-Authenticate": f'Bearer error="invalid_token", credential="{quoted}"', **extra},
        )

    def _words(self) -> list[str]:
        words = self.reply.split(" ")
        return [word if i == len(words) - 1 else word + " " for i, word in enumerate(words)]

    async def anthropic(self, request: web.Request) -> web.StreamResponse:
        asked = msgspec.json.decode(await request.read())
        model = asked.get("model", "claude-fake")
        words = self._words()
        if not asked.get("stream"):
            return web.json_response(
                {
                    "id": "msg_fake",
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [{"type": "text", "text": self.reply}],
                    "stop_reason": "end_turn",
                    "stop_sequence": None,
                    "usage": {"input_tokens": INPUT_TOKENS, "output_tokens": len(words)},
                }
            )
        events = [
            (
                "message_start",
                {
                    "type": "message_start",
                    "message": {
                        "id": "msg_fake",
                        "type": "message",
                        "role": "assistant",
                        "model": model,
                        "content": [],
                        "stop_reason": None,
                        "stop_sequence": None,
                        "usage": {"input_tokens": INPUT_TOKENS, "output_tokens": 1},
                    },
                },
            ),
            (
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            ),
            *(
                (
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": 0,
                        "delta": {"type": "text_delta", "text": word},
                    },
                )
                for word in words
            ),
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": len(words)},
                },
            ),
            ("message_stop", {"type": "message_stop"}),
        ]
        chunks = [
            b"event: %s\ndata: %s\n\n" % (name.encode(), msgspec.json.encode(data)) for name, data in events
        ]
        return await self._stream(request, chunks)

    async def openai(self, request: web.Request) -> web.StreamResponse:
        asked = msgspec.json.decode(await request.read())
        model = asked.get("model", "gpt-fake")
        words = self._words()
        usage = {
            "prompt_tokens": INPUT_TOKENS,
            "completion_tokens": len(words),
            "total_tokens": INPUT_TOKENS + len(words),
        }
        base = {"id": "chatcmpl-fake", "created": int(time.time()), "model": model}
        if not asked.get("stream"):
            return web.json_response(
                {
                    **base,
                    "object": "chat.completion",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": self.reply},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": usage,
                }
            )

        def chunk(delta: dict, finish: str | None = None) -> dict:
            return {
                **base,
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }

        documents = [chunk({"role": "assistant", "content": ""})]
        documents += [chunk({"content": word}) for word in words]
        documents.append(chunk({}, "stop"))
        if (asked.get("stream_options") or {}).get("include_usage"):
            documents.append({**base, "object": "chat.completion.chunk", "choices": [], "usage": usage})
        chunks = [b"data: %s\n\n" % msgspec.json.encode(document) for document in documents]
        return await self._stream(request, [*chunks, b"data: [DONE]\n\n"])

    async def _stream(self, request: web.Request, chunks: list[bytes]) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        try:
            for i, chunk in enumerate(chunks):
                if i and self.chunk_interval:
                    await asyncio.sleep(self.chunk_interval)
                await response.write(chunk)
            await response.write_eof()
        except (asyncio.CancelledError, ConnectionError):
            self.abandoned.set()
            raise
        return response

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    async def redirect_away(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("https://elsewhere.invalid/v1/models")

    async def redirect_home(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/v1/models")

    async def some_bytes(self, request: web.Request) -> web.Response:
        return web.Response(
            body=b"x" * int(request.query.get("size", "0")), content_type="application/octet-stream"
        )


def main() -> None:
    with FakeLLM(sys.argv[1], chunk_interval=float(sys.argv[2]) if len(sys.argv) > 2 else 0.0) as upstream:
        print(upstream.url, flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()
