"""Which route a proxied call takes, and whether its caller may take it (pure).

An agent calls `http://egress/<route>/<path>`; the route's upstream base URL replaces
`/<route>`. The path is checked as the server decoded it, before anything else: a '%' left in it
(a double-encoded character, which the client sending it upstream would decode once more), '\\',
empty, '.' and '..' segments are refused, so a prefix check means the same thing the upstream will
read. Prefixes match whole segments (`/v1/messages` allows `/v1/messages/batches`,
not `/v1/messagesx`); the key-management denylist (`egress.deny_paths`) is matched without regard
to case and wins over a route's own prefixes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from baaaht.common.identity import AgentIdentity
from baaaht.schemas.config import EgressConfig, EgressRoute

from .refusals import Refused

# RFC 3986 pchar plus '/', decoded: unreserved, sub-delims, ':' and '@'.
_PATH_CHARS = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/]*")
_QUERY_CHARS = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/?%]*")


@dataclass(frozen=True)
class Target:
    route: EgressRoute
    path: str  # the path on the upstream, below its base path
    url: str  # the upstream URL the call goes to


def _under(path: str, prefix: str, *, fold_case: bool = False) -> bool:
    """`path` is `prefix` or below it, by whole segments."""
    if fold_case:
        path, prefix = path.lower(), prefix.lower()
    prefix = prefix.rstrip("/")
    return path == prefix or path.startswith(prefix + "/") or prefix == ""


def _open_to(route: EgressRoute, identity: AgentIdentity) -> bool:
    return identity.role in route.roles and ("*" in route.sessions or identity.session_id in route.sessions)


def path_problem(path: str) -> str:
    """Why a request path, as the server decoded it, cannot be matched safely, or ""."""
    if not path.startswith("/"):
        return "the path must start with '/'"
    if "%" in path:  # `%2561` decodes to `%61`, which the upstream client sends as `a`
        return "the path holds a double-encoded character (a '%' once decoded)"
    if not _PATH_CHARS.fullmatch(path):
        return "the path holds characters that are not allowed in a URL path"
    segments = path[1:].split("/")
    if any(segment in ("", ".", "..") for segment in segments[:-1]) or segments[-1] in (".", ".."):
        return "the path holds an empty, '.' or '..' segment"
    return ""


class RouteTable:
    def __init__(self, config: EgressConfig):
        self.routes = {route.name: route for route in config.routes}
        self.deny_paths = tuple(config.deny_paths)

    def target(self, identity: AgentIdentity, method: str, path: str, query: str) -> Target:
        """The call's target, or Refused naming the first rule it breaks."""
        problem = path_problem(path)
        if problem:
            raise Refused(400, "path", problem)
        if query and not _QUERY_CHARS.fullmatch(query):
            raise Refused(400, "path", "the query holds characters that are not allowed in a URL")
        name, _, rest = path[1:].partition("/")
        route = self.routes.get(name)
        if route is None:
            open_to_caller = ", ".join(sorted(r.name for r in self.routes.values() if _open_to(r, identity)))
            raise Refused(
                404, "route", f"no egress route {name!r} (routes open to you: {open_to_caller or 'none'})"
            )
        if identity.role not in route.roles:  # role before session: neither says more than it must
            raise Refused(403, "role", f"route {name!r} is not open to the {identity.role} role")
        if "*" not in route.sessions and identity.session_id not in route.sessions:
            raise Refused(403, "session", f"route {name!r} is not open to session {identity.session_id!r}")
        if method not in route.methods:
            raise Refused(405, "method", f"route {name!r} allows {', '.join(route.methods)}, not {method}")
        rest = "/" + rest
        for denied in self.deny_paths:
            if _under(rest, denied, fold_case=True):
                raise Refused(
                    403, "path", f"{rest} is under {denied}, which egress.deny_paths refuses on every route"
                )
        if not any(_under(rest, allowed) for allowed in route.paths):
            raise Refused(
                403, "path", f"route {name!r} allows paths under {', '.join(route.paths)}, not {rest}"
            )
        base = route.upstream.rstrip("/")
        return Target(route=route, path=rest, url=base + rest + (f"?{query}" if query else ""))


def origin_of(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, (parts.hostname or "").lower(), port


def redirect_location(route: EgressRoute, location: str, request_url: str) -> str:
    """Where the agent may follow an upstream redirect: the same route's proxy path, when the
    Location is on the upstream's own origin and under its base path; otherwise Refused (the key
    never goes to another origin, and the proxy itself follows nothing)."""
    absolute = urljoin(request_url, location)
    base = urlsplit(route.upstream)
    target = urlsplit(absolute)
    base_path = base.path.rstrip("/")
    if origin_of(absolute) != origin_of(route.upstream) or not _under(target.path, base_path or "/"):
        raise Refused(
            502,
            "redirect",
            f"the upstream of route {route.name!r} redirected to another origin or outside its base "
            "path; not followed",
        )
    rest = target.path[len(base_path) :] or "/"
    return f"/{route.name}{rest}" + (f"?{target.query}" if target.query else "")
