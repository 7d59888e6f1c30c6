"""The egress proxy's messages: what it publishes, its usage RPC, its refusal bodies, its audit lines.

Usage is per session; events about a session carry its `session_id` (the topic becomes
`<tag>/<session id>`, see DESIGN and `topic_for`). No message here ever holds a secret, a header
value or a body: only names, sizes, counts and times.
"""

from __future__ import annotations

from typing import ClassVar

import msgspec

from baaaht.schemas.base import Event, Request, Response
from baaaht.schemas.ids import SessionFilter


class EgressErrorDetail(msgspec.Struct, kw_only=True):
    type: str = "egress_refused"
    refused: str  # route, role, session, method, path, identity, credential, budget, size, redirect, upstream
    message: str


class EgressErrorBody(msgspec.Struct, kw_only=True):
    """The JSON body of every answer the proxy gives instead of the upstream's."""

    error: EgressErrorDetail


class SessionUsage(msgspec.Struct, kw_only=True):
    session_id: str
    requests: int = 0  # calls admitted (forwarded or tried)
    refused: int = 0  # calls refused before forwarding
    input_tokens: int = 0
    output_tokens: int = 0
    request_cap: int = 0  # 0: no cap
    token_cap: int = 0  # 0: no cap
    bytes_out: int = 0  # request bodies sent upstream
    bytes_in: int = 0  # response bodies forwarded to agents


class CredentialUsageResult(Response, kw_only=True):
    sessions: list[SessionUsage] = []


class CredentialUsage(Request, tag="credential.usage", kw_only=True):
    """Egress usage per session, kept across restarts of the credential service (all sessions, or one)."""

    response: ClassVar[type] = CredentialUsageResult

    session_id: SessionFilter = ""


class EgressProxied(Event, tag="egress.proxied", kw_only=True):
    """One call that went to an upstream, with the session's totals after it."""

    session_id: str
    container_id: str
    role: str
    route: str
    method: str
    path: str
    status: int  # the upstream's status; 499 when the agent went away first, 502 when the upstream failed
    input_tokens: int = 0
    output_tokens: int = 0
    duration: float = 0.0
    usage: SessionUsage


class EgressRefused(Event, tag="egress.refused", kw_only=True):
    session_id: str = ""  # empty when the caller has no identity
    container_id: str = ""
    role: str = ""
    route: str = ""
    method: str
    path: str
    refused: str
    message: str


class EgressRefusalsSuppressed(Event, tag="egress.refusals_suppressed", kw_only=True):
    """Refused calls of one caller and kind past `egress.refusals_per_minute`: answered as always, but
    neither written nor published one by one; this sums them up (the fields name the last of them)."""

    session_id: str = ""  # empty when the caller has no identity
    container_id: str = ""
    role: str = ""
    refused: str  # what was refused; empty: the agent went away before its call was forwarded
    count: int  # refused calls not recorded one by one since `since`
    since: float  # Unix time the first of them arrived
    route: str = ""
    method: str
    path: str
    message: str = ""


class EgressAuditRecord(msgspec.Struct, kw_only=True):
    """One line of the egress audit log (hash-chained like the policy's; `hash` stays last)."""

    seq: int
    time: float  # Unix time the call arrived
    container_id: str
    session_id: str
    role: str
    route: str
    method: str
    host: str
    path: str
    status: int
    refused: str = ""  # what was refused, when the call never went upstream
    bytes_out: int = 0
    bytes_in: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    duration: float = 0.0
    # >0: a summary line for this many refused calls of this caller and kind not written one by one
    # (past egress.refusals_per_minute); its other fields are the last one's
    suppressed: int = 0
    prev: str = ""
    hash: str = ""
