"""The fetch tool: HTTP only through the egress proxy's unix socket, only to its routes.

The worker has no network of its own; the proxy (docs/EGRESS.md) knows who is calling from the
socket's peer credentials, decides by its routes and adds any credential. A URL that does not start
with the proxy's base URL is refused here, before anything is sent.
"""

from __future__ import annotations

import http.client
from urllib.parse import urlsplit

from baaaht.agent.tools.errors import ToolError
from baaaht.agent.unix_http import UnixHTTPConnection
from baaaht.schemas.errors import ErrorCode
from baaaht.schemas.tools import EGRESS_BASE_URL, ToolFetch, ToolFetchResult

_DROPPED_HEADERS = {"host", "content-length", "transfer-encoding", "connection"}


def egress_target(url: str) -> str:
    """The request target (path and query) of a URL of the proxy; anything else is refused."""
    if not url.startswith(EGRESS_BASE_URL):
        raise ToolError(
            ErrorCode.PERMISSION_DENIED,
            f"url {url!r} is not a route of the egress proxy: fetch takes only {EGRESS_BASE_URL}<route>/...",
            url=url,
        )
    parts = urlsplit(url)
    if parts.username or parts.password or parts.port or parts.fragment or not parts.path.strip("/"):
        raise ToolError.invalid(f"url {url!r} must be {EGRESS_BASE_URL}<route>/<path>[?query]", url=url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


def fetch(socket_path: str, call: ToolFetch) -> ToolFetchResult:
    target = egress_target(call.url)
    headers = {name: value for name, value in call.headers.items() if name.lower() not in _DROPPED_HEADERS}
    connection = UnixHTTPConnection(socket_path, urlsplit(EGRESS_BASE_URL).hostname, call.timeout)
    try:
        connection.request(
            call.method, target, body=call.body.encode() if call.body else None, headers=headers
        )
        response = connection.getresponse()
        body = response.read(call.max_bytes + 1)
        return ToolFetchResult(
            status=response.status,
            headers={name.lower(): value for name, value in response.getheaders()},
            body=body[: call.max_bytes].decode("utf-8", "replace"),
            truncated=len(body) > call.max_bytes,
        )
    except TimeoutError:
        raise ToolError(
            ErrorCode.TIMEOUT, f"fetch {call.url!r} took longer than {call.timeout}s", url=call.url
        ) from None
    except (FileNotFoundError, ConnectionRefusedError):
        raise ToolError(
            ErrorCode.UNAVAILABLE, f"the egress proxy is not listening on {socket_path}", socket=socket_path
        ) from None
    except (OSError, http.client.HTTPException) as error:
        raise ToolError(ErrorCode.UNAVAILABLE, f"fetch {call.url!r} failed: {error}", url=call.url) from None
    finally:
        connection.close()
