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

A test scripts the model: `script` holds one reply per streamed request, in order (then the plain
`reply` again), each a list of steps, JSON-shaped so a script file drives the fake in its own process:

    say("Let me look.")                         text, one chunk per word
    call_tool("read_file", path="notes.txt")    a tool call (its arguments streamed in two pieces)
    say_tool_result("content", line=1)          a line of a field of the request's last tool result
    pause(0.5)                                  nothing for a while (a slow model, to cancel)
    fail(429)                                   an HTTP error answer instead of a stream (first step)
    stream_error("overloaded_error")            the provider's error event inside the stream
    cut()                                       the connection closed mid-stream

    with FakeLLM(tmp_path, script=[[call_tool("read_file", path="notes.txt")],
                                   [say_tool_result("content")]]) as upstream:  # in a thread
        upstream.url, upstream.ca_file, upstream.requests

    python -m baaaht.bus.testing.fake_llm DIR [CHUNK_INTERVAL] [--script FILE]
        # its own process: prints the URL, runs until stdin ends
"""

from __future__ import annotations

import argparse
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
from typing import Any

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


Step = dict[str, Any]


def say(text: str) -> Step:
    return {"say": text}


def call_tool(name: str, call_id: str = "", **arguments: Any) -> Step:
    return {"tool": name, "id": call_id, "input": arguments}


def say_tool_result(field: str = "", line: int = 0) -> Step:
    """Say the request's last tool result: its JSON `field` (whole when ""), its `line` (from 1; 0: all)."""
    return {"tool_result": {"field": field, "line": line}}


def pause(seconds: float) -> Step:
    return {"pause": seconds}


def fail(status: int, error_type: str = "", message: str = "") -> Step:
    return {"fail": status, "type": error_type, "message": message or f"fake upstream error {status}"}


def stream_error(error_type: str = "overloaded_error", message: str = "fake stream error") -> Step:
    return {"stream_error": error_type, "message": message}


def cut() -> Step:
    return {"cut": True}


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 429: "rate_limit_error"}


def _last_tool_result(asked: dict) -> str:
    """The content of the last tool result in a request of either API."""
    found = ""
    for message in asked.get("messages", []):
        if message.get("role") == "tool":
            found = message.get("content") or ""
        elif isinstance(message.get("content"), list):
            for block in message["content"]:
                if block.get("type") == "tool_result":
                    content = block.get("content")
                    found = (
                        content if isinstance(content, str) else "".join(b.get("text", "") for b in content)
                    )
    return found


def _tool_result_text(asked: dict, spec: dict) -> str:
    text = _last_tool_result(asked)
    if spec.get("field"):
        try:
            text = str(msgspec.json.decode(text)[spec["field"]])
        except (msgspec.DecodeError, KeyError, TypeError):
            text = f"(no field {spec['field']!r} in the tool result {text!r})"
    if spec.get("line"):
        lines = text.splitlines()
        text = lines[spec["line"] - 1] if len(lines) >= spec["line"] else ""
    return text


def _words_of(text: str) -> list[str]:
    words = text.split(" ")
    return [word if i == len(words) - 1 else word + " " for i, word in enumerate(words)]


class _Cut(Exception):
    """A scripted `cut()`: close the connection without ending the response."""


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
    script: list[list[Step]] = field(default_factory=list)  # one reply per streamed request, then `reply`
    requests: list[SeenRequest] = field(default_factory=list)
    abandoned: threading.Event = field(default_factory=threading.Event)  # a stream's reader went away
    reject_key: bool = False  # answer 401, quoting the credential headers
    reject_encoding: str = ""  # "gzip": that 401's body compressed
    reject_padding: int = 0  # filler bytes in that 401's message before the quoted key
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
                "error": {
                    "type": "authentication_error",
                    "message": f"invalid credential: {'x' * self.reject_padding}{quoted}",
                },
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
        return _words_of(self.reply)

    def _scripted(self, asked: dict) -> list[Step] | None:
        """The next scripted reply for a streamed request, or None (then the plain reply)."""
        return self.script.pop(0) if asked.get("stream") and self.script else None

    async def anthropic(self, request: web.Request) -> web.StreamResponse:
        asked = msgspec.json.decode(await request.read())
        model = asked.get("model", "claude-fake")
        if (steps := self._scripted(asked)) is not None:
            return await self._anthropic_script(request, asked, model, steps)
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
        if (steps := self._scripted(asked)) is not None:
            return await self._openai_script(request, asked, model, steps)
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

    # -- scripted replies -------------------------------------------------------------------------

    async def _anthropic_script(self, request: web.Request, asked: dict, model: str, steps: list[Step]):
        if steps and "fail" in steps[0]:
            step = steps[0]
            error = {
                "type": step["type"] or ERROR_TYPES.get(step["fail"], "api_error"),
                "message": step["message"],
            }
            return web.json_response({"type": "error", "error": error}, status=step["fail"])

        def event(name: str, data: dict) -> bytes:
            return b"event: %s\ndata: %s\n\n" % (name.encode(), msgspec.json.encode({"type": name, **data}))

        def produce():
            message = {
                "id": "msg_fake",
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [],
            }
            message |= {"stop_reason": None, "stop_sequence": None}
            yield event(
                "message_start",
                {"message": {**message, "usage": {"input_tokens": INPUT_TOKENS, "output_tokens": 1}}},
            )
            index, used_tools, output = 0, False, 0
            for step in steps:
                if "say" in step or "tool_result" in step:
                    text = step["say"] if "say" in step else _tool_result_text(asked, step["tool_result"])
                    yield event(
                        "content_block_start", {"index": index, "content_block": {"type": "text", "text": ""}}
                    )
                    for word in _words_of(text):
                        output += 1
                        yield event(
                            "content_block_delta",
                            {"index": index, "delta": {"type": "text_delta", "text": word}},
                        )
                    yield event("content_block_stop", {"index": index})
                    index += 1
                elif "tool" in step:
                    used_tools = True
                    block = {
                        "type": "tool_use",
                        "id": step["id"] or f"toolu_{index}",
                        "name": step["tool"],
                        "input": {},
                    }
                    yield event("content_block_start", {"index": index, "content_block": block})
                    arguments = msgspec.json.encode(step["input"]).decode()
                    half = len(arguments) // 2
                    for piece in (arguments[:half], arguments[half:]):
                        yield event(
                            "content_block_delta",
                            {"index": index, "delta": {"type": "input_json_delta", "partial_json": piece}},
                        )
                    yield event("content_block_stop", {"index": index})
                    index += 1
                elif "pause" in step:
                    yield step["pause"]
                elif "stream_error" in step:
                    yield event(
                        "error", {"error": {"type": step["stream_error"], "message": step["message"]}}
                    )
                    return
                elif "cut" in step:
                    raise _Cut()
            stop = "tool_use" if used_tools else "end_turn"
            yield event(
                "message_delta",
                {"delta": {"stop_reason": stop, "stop_sequence": None}, "usage": {"output_tokens": output}},
            )
            yield event("message_stop", {})

        return await self._stream(request, produce())

    async def _openai_script(self, request: web.Request, asked: dict, model: str, steps: list[Step]):
        if steps and "fail" in steps[0]:
            step = steps[0]
            error = {
                "message": step["message"],
                "type": step["type"] or ERROR_TYPES.get(step["fail"], "server_error"),
            }
            return web.json_response({"error": {**error, "code": None, "param": None}}, status=step["fail"])
        base = {
            "id": "chatcmpl-fake",
            "created": int(time.time()),
            "model": model,
            "object": "chat.completion.chunk",
        }

        def chunk(delta: dict, finish: str | None = None) -> bytes:
            document = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return b"data: %s\n\n" % msgspec.json.encode(document)

        def produce():
            yield chunk({"role": "assistant", "content": ""})
            tools, output = 0, 0
            for step in steps:
                if "say" in step or "tool_result" in step:
                    text = step["say"] if "say" in step else _tool_result_text(asked, step["tool_result"])
                    for word in _words_of(text):
                        output += 1
                        yield chunk({"content": word})
                elif "tool" in step:
                    arguments = msgspec.json.encode(step["input"]).decode()
                    half = len(arguments) // 2
                    call_id = step["id"] or f"call_{tools}"
                    first = {"index": tools, "id": call_id, "type": "function"}
                    yield chunk(
                        {
                            "tool_calls": [
                                {**first, "function": {"name": step["tool"], "arguments": arguments[:half]}}
                            ]
                        }
                    )
                    yield chunk(
                        {"tool_calls": [{"index": tools, "function": {"arguments": arguments[half:]}}]}
                    )
                    tools += 1
                elif "pause" in step:
                    yield step["pause"]
                elif "stream_error" in step:
                    yield b"data: %s\n\n" % msgspec.json.encode(
                        {"error": {"message": step["message"], "type": step["stream_error"]}}
                    )
                    return
                elif "cut" in step:
                    raise _Cut()
            yield chunk({}, "tool_calls" if tools else "stop")
            usage = {
                "prompt_tokens": INPUT_TOKENS,
                "completion_tokens": output,
                "total_tokens": INPUT_TOKENS + output,
            }
            yield b"data: %s\n\n" % msgspec.json.encode({**base, "choices": [], "usage": usage})
            yield b"data: [DONE]\n\n"

        return await self._stream(request, produce())

    async def _stream(self, request: web.Request, chunks) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        try:
            for i, chunk in enumerate(chunks):
                if isinstance(chunk, (int, float)):  # a scripted pause
                    await asyncio.sleep(chunk)
                    continue
                if i and self.chunk_interval:
                    await asyncio.sleep(self.chunk_interval)
                await response.write(chunk)
            await response.write_eof()
        except _Cut:
            request.transport.close()  # no last chunk: the client sees its stream end mid-answer
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
    parser = argparse.ArgumentParser(prog="python -m baaaht.bus.testing.fake_llm")
    parser.add_argument("directory", help="where its test CA is written")
    parser.add_argument("chunk_interval", nargs="?", type=float, default=0.0, help="seconds between chunks")
    parser.add_argument("--script", help="a JSON file: a list of scripted replies, each a list of steps")
    args = parser.parse_args()
    script = msgspec.json.decode(Path(args.script).read_bytes()) if args.script else []
    with FakeLLM(args.directory, chunk_interval=args.chunk_interval, script=script) as upstream:
        print(upstream.url, flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()
