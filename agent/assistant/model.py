"""What a provider's stream becomes, whichever the provider: the model's text as it comes, the tool
calls it asks for, how it stopped; and its errors, classified so the loop knows which to retry."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Protocol

from baaaht.schemas.sessions import Message, MessageToolCall


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class ToolCallReady:
    """A tool call whose arguments are complete."""

    call: MessageToolCall


@dataclass(frozen=True)
class Finished:
    stop_reason: str  # the provider's own word: end_turn, tool_use, stop, tool_calls, max_tokens, length...
    input_tokens: int = 0
    output_tokens: int = 0


ModelEvent = TextDelta | ToolCallReady | Finished


@dataclass
class ModelReply:
    """One model call's answer, gathered from its events."""

    text: str = ""
    tool_calls: list[MessageToolCall] = field(default_factory=list)
    stop_reason: str = ""


@dataclass(frozen=True)
class ModelRequest:
    system: str
    messages: list[Message]  # the context (agent/assistant/context.py), oldest first
    tools: list[dict]  # schemas/tools.py tool_schemas()


class ProviderError(Exception):
    """A model call that failed. `kind`: refused (the egress proxy's own refusal: no route or
    credential, a budget), auth (401/403 of the provider), rate_limit (429), server (5xx, 529),
    connection (the proxy unreachable), cut (the stream ended before the model finished), bad_request
    (another 4xx). rate_limit, server, connection and cut are worth a retry."""

    RETRYABLE = frozenset({"rate_limit", "server", "connection", "cut"})

    def __init__(self, kind: str, message: str, status: int = 0, refused: str = "", retry_after: float = 0.0):
        super().__init__(message)
        self.kind, self.status, self.refused, self.retry_after = kind, status, refused, retry_after

    @property
    def retryable(self) -> bool:
        return self.kind in self.RETRYABLE


class Model(Protocol):
    provider: str  # anthropic | openai
    route: str  # the egress route it is reached through

    def stream(self, request: ModelRequest) -> AsyncIterator[ModelEvent]:
        """The model's answer as events, ending with Finished; ProviderError when it fails."""
        ...


def status_kind(status: int) -> str:
    """The kind of a provider's HTTP error status."""
    if status in (401, 403):
        return "auth"
    if status == 429:
        return "rate_limit"
    if status >= 500:
        return "server"
    return "bad_request"


def error_type_kind(error_type: str) -> str:
    """The kind of an error reported inside a stream (status 200), by the provider's error type."""
    if "rate_limit" in error_type:
        return "rate_limit"
    if error_type in ("invalid_request_error", "authentication_error", "permission_error", "not_found_error"):
        return "bad_request"
    return "server"  # overloaded_error, api_error, server_error, or one not known: worth a retry


def egress_refusal(body: object) -> str:
    """What the egress proxy refused (`route`, `credential`, `budget`, ...) when `body` is its own JSON
    refusal, else ''."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and error.get("type") == "egress_refused":
        return str(error.get("refused", "")) or "egress"
    return ""


def status_error(status: int, body: object, message: str) -> ProviderError:
    """The ProviderError of an error answer (or, with a status below 400, of an error event inside a
    stream), the egress proxy's refusals told apart from the provider's errors."""
    if isinstance(body, dict) and not isinstance(body.get("error"), dict):
        body = {"error": body}  # the openai SDK hands over the inner `error` object alone
    error = body.get("error") if isinstance(body, dict) else None
    error = error if isinstance(error, dict) else {}
    if refused := egress_refusal(body):
        return ProviderError("refused", str(error.get("message") or message), status, refused)
    if status < 400:
        return ProviderError(error_type_kind(str(error.get("type", ""))), message, status)
    return ProviderError(status_kind(status), message, status)
