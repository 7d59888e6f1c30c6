"""The headers of a proxied call, both ways (pure).

Towards the upstream: everything the agent sent that could carry or fake a credential is dropped
(Authorization, Proxy-Authorization, x-api-key, api-key, Cookie, the route's own header), with the
hop-by-hop headers, Host and the length (the client sets both again), and the route's injection is
added. Accept-Encoding becomes identity so the proxy reads the usage the responses carry.
Towards the agent: hop-by-hop headers and cookies are dropped, and intermediary buffering is
turned off for the stream.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable

from baaaht.schemas.config import EgressRoute

from .refusals import Refused

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
    }
)
CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "x-api-key", "api-key", "cookie"})
_NOT_FORWARDED = HOP_BY_HOP | CREDENTIAL_HEADERS | {"host", "content-length", "accept-encoding"}
_NOT_RETURNED = HOP_BY_HOP | {"set-cookie", "content-length"}


def injected(route: EgressRoute, kind: str, value: bytes) -> tuple[str, str]:
    """The header that carries the secret on this route."""
    if any(byte in value for byte in b"\r\n\0"):
        raise Refused(500, "credential", f"credential {route.credential!r} holds a line break: unusable")
    try:
        text = value.decode("ascii")
    except UnicodeDecodeError:
        raise Refused(500, "credential", f"credential {route.credential!r} is not ASCII: unusable") from None
    if route.inject == "bearer":
        return "Authorization", f"Bearer {text}"
    if route.inject == "basic":
        if kind != "basic" and ":" not in text:
            raise Refused(500, "credential", f"credential {route.credential!r} is not user:password")
        return "Authorization", "Basic " + base64.b64encode(value).decode("ascii")
    if route.inject == "x-api-key":
        return "x-api-key", text
    return route.header, text


def upstream_headers(
    agent_headers: Iterable[tuple[str, str]], route: EgressRoute, credential: tuple[str, str]
) -> list[tuple[str, str]]:
    dropped = _NOT_FORWARDED | {route.header.lower()} if route.header else _NOT_FORWARDED
    named_by_connection = set()
    headers = list(agent_headers)
    for name, value in headers:
        if name.lower() == "connection":  # `Connection: x-foo` makes x-foo hop-by-hop too
            named_by_connection.update(part.strip().lower() for part in value.split(","))
    kept = [
        (name, value)
        for name, value in headers
        if name.lower() not in dropped and name.lower() not in named_by_connection
    ]
    return [*kept, ("Accept-Encoding", "identity"), credential]


def agent_headers(upstream: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    kept = [(name, value) for name, value in upstream if name.lower() not in _NOT_RETURNED]
    return [*kept, ("X-Accel-Buffering", "no")]
