"""What code inside the credential service's process (the egress proxy) gets secrets through.

    secret = source.secret_for("anthropic")      # Secret(kind, value, version), or SecretError
    ...inject secret.value into the upstream request...
    source.mark_used("anthropic")

A `Secret` never shows its value in a repr or str, so a log line or a traceback that prints one
prints `<hidden>`. A missing or expired secret raises a SecretError subclass whose message names
the secret and the reason (never a value), fit for an error body.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Secret:
    """A secret's current value, decrypted for one use: do not keep it."""

    name: str
    kind: str  # api_key, bearer_token or basic (value `user:password`)
    version: int
    value: bytes = field(repr=False)

    def __repr__(self) -> str:
        return f"Secret(name={self.name!r}, kind={self.kind!r}, version={self.version}, value=<hidden>)"

    __str__ = __repr__


class SecretError(Exception):
    """A secret that cannot be handed out; `reason` is a short machine-readable word."""

    reason = "unavailable"

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name
        self.message = message


class SecretNotFound(SecretError):
    reason = "not_found"

    def __init__(self, name: str):
        super().__init__(name, f"no credential named {name!r}")


class SecretExpired(SecretError):
    reason = "expired"

    def __init__(self, name: str, expires_at: float):
        super().__init__(name, f"credential {name!r} expired (at {expires_at:.0f}, Unix time)")
        self.expires_at = expires_at


class SecretSource(Protocol):
    """Thread-safe; each call is a short blocking read of the store (run it in an executor from asyncio
    if microseconds to a few milliseconds matter)."""

    def secret_for(self, name: str) -> Secret:
        """The current version of `name`; SecretNotFound or SecretExpired when it cannot be used."""
        ...

    def mark_used(self, name: str) -> None:
        """Record that `name` was just used (its last_used_at; written to the store in batches)."""
        ...
