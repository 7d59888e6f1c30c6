"""Removing a key the upstream echoes back before the answer reaches the agent (pure).

An API that rejects a key often quotes it ("invalid x-api-key: sk-..."), in an error body or a header;
the agent must not learn it that way. Every header returned to the agent, and every error body (status
400 and up, small and read whole), has each form the key could be quoted in replaced by REDACTED: its
bytes, their base64 (what basic injection sends), the header value injected (`Bearer ...`), and for a
basic credential the password alone. Success bodies are streamed untouched (an upstream that put the key
into a model's answer is out of scope: the route trusts its upstream that far).
"""

from __future__ import annotations

import base64

REDACTED = b"[redacted by the egress proxy]"
MIN_FORM = 4  # shorter fragments (a tiny password) would redact ordinary text, and leak little


def echo_forms(kind: str, value: bytes, injected_value: str) -> tuple[bytes, ...]:
    """The byte strings an echo of this credential could contain, longest first (so a longer form is
    replaced whole before a shorter one inside it)."""
    forms = {value, base64.b64encode(value), injected_value.encode("ascii")}
    if kind == "basic":
        forms.add(value.partition(b":")[2])
    return tuple(sorted((form for form in forms if len(form) >= MIN_FORM), key=len, reverse=True))


def scrub(data: bytes, forms: tuple[bytes, ...]) -> bytes:
    for form in forms:
        if form in data:
            data = data.replace(form, REDACTED)
    return data


def scrub_headers(headers: list[tuple[str, str]], forms: tuple[bytes, ...]) -> list[tuple[str, str]]:
    """Header values with the forms redacted (aiohttp hands values decoded as UTF-8, undecodable bytes
    kept as surrogates: encoded back the same way, they are the bytes the upstream sent)."""
    return [
        (name, scrub(value.encode("utf-8", "surrogateescape"), forms).decode("utf-8", "surrogateescape"))
        for name, value in headers
    ]
