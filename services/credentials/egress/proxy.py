"""The proxy itself: an aiohttp server on the agents' unix socket, an aiohttp client upstream.

aiohttp on both sides: one asyncio library whose server hands a handler the connection's socket
(for SO_PEERCRED), cancels the handler when the agent disconnects (`handler_cancellation`, which
closes the upstream request with it), streams a response chunk by chunk as it is written, and whose
client verifies TLS against an explicit SSLContext, follows no redirect when told so and reads
neither proxy variables nor .netrc (`trust_env=False`); its HTTP parser is C (llhttp), which keeps
the time the proxy adds small.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
import weakref

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from baaaht.schemas.config import EgressConfig
from baaaht.services.credentials.source import SecretError, SecretExpired, SecretSource

from .budgets import Budgets
from .callers import Callers, container_of_peer
from .headers import agent_headers, injected, upstream_headers
from .journal import Call, Journal
from .refusal_limit import RefusalLimit
from .refusals import Refused
from .routes import RouteTable, Target, redirect_location
from .scrub import echo_forms, scrub, scrub_headers
from .usage import usage_reader, with_usage_requested

log = logging.getLogger("baaaht.egress")
SHUTDOWN_TIMEOUT = 5.0  # seconds calls in flight get when the proxy stops
CLIENT_GONE = 499  # the status recorded when the agent went away before the response ended
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
ERROR_STATUS = 400  # from here on a body is read whole and scrubbed of the key before the agent sees it
REFUSALS_SUMMED_EVERY = 60.0  # seconds: the refusals past egress.refusals_per_minute are summed up this often
MAX_ERROR_BODY = 1 << 20  # bytes of an error body handed on; the rest is cut
WITHHELD = (
    b"the upstream's error body was %s-encoded and is withheld by the egress proxy: it could quote the key"
)


def upstream_ssl_context(ca_file: str) -> ssl.SSLContext:
    """The system's trust store, plus `egress.ca_file` when set; hostnames always checked."""
    context = ssl.create_default_context()
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    return context


class EgressProxy:
    def __init__(
        self,
        config: EgressConfig,
        *,
        callers: Callers,
        secrets: SecretSource,
        journal: Journal,
        budgets: Budgets,
    ):
        self.config = config
        self.routes = RouteTable(config)
        self.callers = callers
        self.secrets = secrets
        self.journal = journal
        self.budgets = budgets
        self.refusals = RefusalLimit(config.refusals_per_minute)
        self._summing: asyncio.Task | None = None
        self._containers: weakref.WeakKeyDictionary[asyncio.BaseTransport, str | None] = (
            weakref.WeakKeyDictionary()
        )
        self._client: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None

    async def start(self, sock: socket.socket) -> None:
        """Serve on a bound, listening unix socket."""
        self._client = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=upstream_ssl_context(self.config.ca_file)),
            timeout=aiohttp.ClientTimeout(
                total=self.config.upstream_timeout, connect=self.config.connect_timeout
            ),
            auto_decompress=False,
            trust_env=False,
            skip_auto_headers=("User-Agent",),
        )
        app = web.Application(client_max_size=self.config.max_request_size)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT
        )
        try:
            await self._runner.setup()
            await web.SockSite(self._runner, sock).start()
        except BaseException:
            await self.close()
            raise
        self._summing = asyncio.create_task(self._sum_up_refusals_every(REFUSALS_SUMMED_EVERY))

    async def close(self) -> None:
        if self._summing is not None:
            self._summing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._summing
        if self._runner is not None:
            await self._runner.cleanup()
        if self._client is not None:
            await self._client.close()
        self._sum_up_refusals()  # after the last call: none is left uncounted

    async def _sum_up_refusals_every(self, period: float) -> None:
        while True:
            await asyncio.sleep(period)
            try:
                self._sum_up_refusals()
            except Exception:  # the next period sums up what this one could not: the loop must go on
                log.exception("summing up the refused calls failed")

    def _sum_up_refusals(self) -> None:
        self.journal.record(*self.refusals.summaries(time.monotonic()))

    # -- one call ---------------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        call = Call(
            started=time.monotonic(), started_at=time.time(), method=request.method, path=request.path
        )
        try:
            return await self._serve(request, call)
        except Refused as refusal:
            call.status, call.refused, call.message = refusal.status, refusal.refused, refusal.message
            return web.Response(status=refusal.status, body=refusal.body(), content_type="application/json")
        except (asyncio.CancelledError, ConnectionResetError):  # the agent went away mid-call
            call.status = CLIENT_GONE
            raise
        finally:
            self._finish(call)

    async def _serve(self, request: web.Request, call: Call) -> web.StreamResponse:
        call.container_id = self._container_of(request)
        identity = self.callers.identity(call.container_id) if call.container_id else None
        if identity is None:
            raise Refused(403, "identity", "this connection is not from an agent container with an identity")
        call.identity = identity
        target = call.target = self.routes.target(
            identity, request.method, request.path, request.query_string
        )
        try:
            secret = self.secrets.secret_for(target.route.credential)
        except SecretExpired as error:
            raise Refused(403, "credential", error.message) from None
        except SecretError as error:
            raise Refused(503, "credential", error.message) from None
        credential = injected(target.route, secret.kind, secret.value)
        echoes = echo_forms(secret.kind, secret.value, credential[1])
        del secret
        body = await self._body(request)
        if target.route.usage == "openai":
            body = with_usage_requested(body)
        headers = upstream_headers(request.headers.items(), target.route, credential)
        self.budgets.admit(identity.session_id)
        call.forwarded = True
        call.bytes_out = len(body)
        return await self._forward(request, call, target, headers, body, echoes)

    def _container_of(self, request: web.Request) -> str:
        """The caller's container, looked up once per connection."""
        transport = request.transport
        if transport is None:
            return ""
        if transport not in self._containers:
            sock = transport.get_extra_info("socket")
            self._containers[transport] = container_of_peer(self.callers, sock) if sock else None
        return self._containers[transport] or ""

    async def _body(self, request: web.Request) -> bytes:
        cap = self.config.max_request_size
        if request.content_length is not None and request.content_length > cap:
            raise Refused(413, "size", f"the request body is {request.content_length} bytes, over {cap}")
        body = bytearray()
        async for chunk in request.content.iter_any():
            body += chunk
            if len(body) > cap:
                raise Refused(413, "size", f"the request body is over {cap} bytes")
        return bytes(body)

    async def _forward(
        self, request, call: Call, target: Target, headers, body: bytes, echoes: tuple[bytes, ...]
    ) -> web.StreamResponse:
        assert self._client is not None
        try:
            upstream = await self._client.request(
                request.method, target.url, headers=headers, data=body, allow_redirects=False
            )
        except (aiohttp.ClientError, asyncio.TimeoutError) as error:
            raise Refused(
                502, "upstream", f"the upstream of route {target.route.name!r} failed: {_why(error)}"
            ) from None
        async with upstream:
            call.status = upstream.status
            returned = CIMultiDict(scrub_headers(agent_headers(upstream.headers.items()), echoes))
            if upstream.status in _REDIRECTS and "Location" in upstream.headers:
                returned["Location"] = redirect_location(
                    target.route, upstream.headers["Location"], target.url
                )
            cap = self.config.max_response_size
            if upstream.content_length is not None and upstream.content_length > cap:
                raise Refused(
                    502, "size", f"the upstream's response is {upstream.content_length} bytes, over {cap}"
                )
            if upstream.status >= ERROR_STATUS:
                return await self._error_answer(upstream, call, returned, echoes)
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=returned)
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            reader = (
                usage_reader(upstream.headers.get("Content-Type", ""))
                if target.route.usage != "none"
                else None
            )
            await response.prepare(request)
            try:
                async for chunk in upstream.content.iter_any():
                    call.bytes_in += len(chunk)
                    if call.bytes_in > cap:
                        call.refused = "size"
                        raise ConnectionAbortedError(
                            "the upstream's response went over egress.max_response_size"
                        )
                    if reader is not None:
                        reader.feed(chunk)
                    await response.write(chunk)
            finally:
                if reader is not None:
                    call.usage = reader.usage()
            self._account(call)  # before the agent sees the end: its next call meets the new totals
            await response.write_eof()
            return response

    async def _error_answer(
        self, upstream: aiohttp.ClientResponse, call: Call, returned: CIMultiDict, echoes: tuple[bytes, ...]
    ) -> web.Response:
        """An upstream error, read whole (it is small) and handed on with any echo of the key redacted.
        An encoded body cannot be searched: it is withheld, with a note saying so."""
        # Read past the cut by the longest form: a key that starts before the cut is then whole, and redacted.
        limit = MAX_ERROR_BODY + max(map(len, echoes), default=0)
        body = bytearray()
        async for chunk in upstream.content.iter_any():
            body += chunk
            if len(body) >= limit:
                break
        call.bytes_in = len(body)
        encoding = upstream.headers.get("Content-Encoding", "identity").lower()
        if encoding != "identity":
            returned.popall("Content-Encoding")
            returned["Content-Type"] = "text/plain; charset=utf-8"
            answer = WITHHELD % encoding.encode("latin-1", "replace")
        else:
            answer = scrub(bytes(body), echoes)[:MAX_ERROR_BODY]
        return web.Response(status=upstream.status, reason=upstream.reason, headers=returned, body=answer)

    def _account(self, call: Call) -> None:
        """Add a forwarded call to its session's usage, once."""
        if call.forwarded and call.usage_after is None:
            call.usage_after = self.budgets.record(
                call.identity.session_id, call.usage, call.bytes_out, call.bytes_in
            )
            self.secrets.mark_used(call.target.route.credential)

    def _finish(self, call: Call) -> None:
        call.duration = time.monotonic() - call.started
        if call.forwarded:
            self._account(call)
            self.journal.record(call)
            return
        if call.identity is not None:
            self.budgets.refused(call.identity.session_id)
        if self.refusals.records(call, time.monotonic()):
            self.journal.record(call)


def _why(error: BaseException) -> str:
    if isinstance(error, asyncio.TimeoutError):
        return "no answer in time"
    if isinstance(error, aiohttp.ClientConnectorCertificateError):
        return "its TLS certificate is not trusted (see egress.ca_file)"
    if isinstance(error, aiohttp.ClientConnectorError):
        return f"cannot connect ({error.os_error.strerror or error.os_error})"
    return type(error).__name__
