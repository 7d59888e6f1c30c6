"""LLM token usage read from responses as they pass (pure, incremental).

Anthropic Messages report `usage` in the JSON body, or in a stream in `message_start`
(`message.usage`: input, cache and a first output count) and `message_delta` (`usage`: the output
so far); OpenAI chat completions report `usage` in the body, or in a stream's last chunk when the
request asked for it (`stream_options.include_usage`, which the proxy adds on `usage: openai`
routes); the Responses API in `response.usage`. Counts in a stream are cumulative, so each field
keeps the largest value seen. Only bounded SSE lines are kept, and a JSON body whole up to a bound;
past it only its end, where `usage` is (the last key of either API's answer): an agent asking for a
huge answer (OpenAI's logprobs, n choices) must not make its tokens uncounted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import msgspec

MAX_KEPT = 4 * 1024 * 1024  # bytes of a JSON body, or of one SSE line, kept for reading usage
# Bytes of the end of a JSON body over MAX_KEPT, kept for its usage (and what the answer echoes after it).
TAIL_KEPT = 256 * 1024
_USAGE_KEY = re.compile(rb'"usage"\s*:\s*')
_BRACES = {ord("{"): 1, ord("}"): -1}
_INPUT_FIELDS = ("input_tokens", "prompt_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
_OUTPUT_FIELDS = ("output_tokens", "completion_tokens")
_decode = msgspec.json.decode


@dataclass(frozen=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0

    @property
    def total(self) -> int:
        return self.input_tokens + self.output_tokens


def _usage_objects(document: object) -> list[dict]:
    if not isinstance(document, dict):
        return []
    found = [document.get("usage")]
    for holder in ("message", "response"):
        inner = document.get(holder)
        if isinstance(inner, dict):
            found.append(inner.get("usage"))
    return [usage for usage in found if isinstance(usage, dict)]


def usage_reader(content_type: str) -> "UsageReader | None":
    """A reader for a body that can report usage (JSON or Server-Sent Events; an untyped body is read
    as JSON); None for any other type, whose chunks then pass with no Python work on them."""
    kind = content_type.split(";")[0].strip().lower()
    if kind in ("", "text/event-stream", "application/json") or kind.endswith("+json"):
        return UsageReader(content_type)
    return None


class UsageReader:
    """Feed it the response body's chunks; `usage()` says what they reported."""

    def __init__(self, content_type: str):
        self.streamed = content_type.split(";")[0].strip().lower() == "text/event-stream"
        self._kept = bytearray()  # the JSON body, or the SSE line so far
        self._too_long = False  # what is being kept went over MAX_KEPT: it is skipped
        self._largest: dict[str, int] = {}

    def feed(self, chunk: bytes) -> None:
        if not self.streamed:
            self._keep_json(chunk)
            return
        first = chunk.find(b"\n")
        if first < 0:
            self._keep(chunk)
            return
        self._keep(chunk[:first])
        self._end_line()
        last = chunk.rfind(b"\n")
        # The whole lines in between are read in place, and split only when one names usage.
        if chunk.find(b'"usage"', first + 1, last) >= 0:
            for line in chunk[first + 1 : last].split(b"\n"):
                self._line(line)
        self._keep(chunk[last + 1 :])

    def _keep_json(self, chunk: bytes) -> None:
        """The body whole while it fits MAX_KEPT; past it, its last TAIL_KEPT bytes."""
        self._kept += chunk
        if len(self._kept) > MAX_KEPT or (self._too_long and len(self._kept) > 2 * TAIL_KEPT):
            self._too_long = True
            del self._kept[:-TAIL_KEPT]

    def _keep(self, part: bytes) -> None:
        if self._too_long:
            return
        if len(self._kept) + len(part) > MAX_KEPT:
            self._too_long = True
            self._kept.clear()
        else:
            self._kept += part

    def _end_line(self) -> None:
        if not self._too_long:
            self._line(bytes(self._kept))
        self._kept.clear()
        self._too_long = False

    def _line(self, line: bytes) -> None:
        if line.startswith(b"data:") and b'"usage"' in line and len(line) <= MAX_KEPT:
            self._take(line[5:].strip())

    def _take(self, text: bytes) -> None:
        try:
            document = _decode(text)
        except msgspec.DecodeError:
            return
        for usage in _usage_objects(document):
            self._count(usage)

    def _take_trailing(self, tail: bytes) -> None:
        for usage in trailing_usages(tail):
            self._count(usage)

    def _count(self, usage: dict) -> None:
        for name, value in usage.items():
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                self._largest[name] = max(self._largest.get(name, 0), value)

    def usage(self) -> Usage:
        if self.streamed:
            self._end_line()
        elif not self._too_long:
            self._take(bytes(self._kept))
        else:
            self._take_trailing(bytes(self._kept))
        self._kept.clear()
        return Usage(
            input_tokens=sum(self._largest.get(name, 0) for name in _INPUT_FIELDS),
            output_tokens=sum(self._largest.get(name, 0) for name in _OUTPUT_FIELDS),
        )


def trailing_usages(tail: bytes) -> list[dict]:
    """Every `"usage": {...}` object in the end of a JSON body. That key never occurs inside a string (a
    quote there is escaped), and the object holds only numbers and objects: its braces match. All of
    them, not the last: an answer may echo after its usage what the agent sent (the Responses API's
    `metadata`, `user`), and a `"usage"` key there must not hide the real one (each field counts its
    largest value, so a made-up one can only add to the agent's own count)."""
    found = []
    for key in _USAGE_KEY.finditer(tail):
        start, depth = key.end(), 0
        if tail[start : start + 1] != b"{":
            continue
        for end in range(start, len(tail)):
            depth += _BRACES.get(tail[end], 0)
            if depth == 0:
                try:
                    usage = _decode(tail[start : end + 1])
                except msgspec.DecodeError:
                    break
                if isinstance(usage, dict):
                    found.append(usage)
                break
    return found


def with_usage_requested(body: bytes) -> bytes:
    """An OpenAI streaming request asking for the usage chunk; any other body as it is."""
    try:
        document = _decode(body)
    except msgspec.DecodeError:
        return body
    if not isinstance(document, dict) or document.get("stream") is not True:
        return body
    options = document.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return body
    document["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return msgspec.json.encode(document)
