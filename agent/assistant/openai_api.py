"""OpenAI-compatible chat completions: our context as its request, its stream's chunks as our events.

`request_body` and `StreamAdapter` are pure (tested on scripted streams); `OpenAIModel` is the
official SDK, streaming through the egress proxy."""

from __future__ import annotations

from typing import AsyncIterator

import openai

from baaaht.agent.assistant.context import every_call_answered, user_text
from baaaht.agent.assistant.model import (
    Finished,
    ModelEvent,
    ModelRequest,
    ProviderError,
    TextDelta,
    ToolCallReady,
)
from baaaht.agent.assistant.streaming import sdk_events
from baaaht.schemas.sessions import Message, MessageToolCall


def _message(message: Message) -> dict:
    if message.role == "tool":
        return {"role": "tool", "tool_call_id": message.metadata.tool_call_id, "content": message.content}
    if message.role == "assistant":
        found: dict = {"role": "assistant", "content": message.content or None}
        if message.metadata.tool_calls:
            found["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments or "{}"},
                }
                for c in message.metadata.tool_calls
            ]
        return found
    return {"role": "user", "content": user_text(message)}


def tool_definitions(tools: list[dict]) -> list[dict]:
    """schemas/tools.py tool_schemas() as chat-completions function tools."""
    return [
        {
            "type": "function",
            "function": {"name": t["name"], "description": t["description"], "parameters": t["input_schema"]},
        }
        for t in tools
    ]


def request_body(request: ModelRequest, model: str, max_tokens: int) -> dict:
    messages = [{"role": "system", "content": request.system}] if request.system else []
    messages += [_message(m) for m in every_call_answered(request.messages)]
    body = {
        "model": model,
        "messages": messages,
        "max_completion_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if request.tools:
        body["tools"] = tool_definitions(request.tools)
    return body


class StreamAdapter:
    """Feed it the stream's chunks (as dicts) in order; it answers each with our events. Tool calls
    come in pieces keyed by index; they are ready when the choice finishes."""

    def __init__(self) -> None:
        self._tools: dict[int, dict] = {}
        self._finish = ""
        self._usage: dict = {}
        self.started = False  # any chunk came

    def feed(self, chunk: dict) -> list[ModelEvent]:
        self.started = True
        found: list[ModelEvent] = []
        if chunk.get("usage"):
            self._usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                found.append(TextDelta(delta["content"]))
            for piece in delta.get("tool_calls") or []:
                tool = self._tools.setdefault(piece.get("index", 0), {"id": "", "name": "", "arguments": ""})
                function = piece.get("function") or {}
                tool["id"] = piece.get("id") or tool["id"]
                tool["name"] = function.get("name") or tool["name"]
                tool["arguments"] += function.get("arguments") or ""
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]
                found += [
                    ToolCallReady(
                        MessageToolCall(id=t["id"], name=t["name"], arguments=t["arguments"] or "{}")
                    )
                    for _, t in sorted(self._tools.items())
                ]
                self._tools.clear()
        return found

    def end(self) -> list[ModelEvent]:
        """The stream is over: Finished, or ProviderError `cut` when no choice had finished."""
        if not self._finish:
            raise ProviderError("cut", "the openai stream ended before the model finished its answer")
        usage = self._usage
        return [Finished(self._finish, usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0)]


class OpenAIModel:
    provider = "openai"

    def __init__(self, client: openai.AsyncOpenAI, model: str, route: str, max_tokens: int):
        self.client, self.model, self.route, self.max_tokens = client, model, route, max_tokens

    def stream(self, request: ModelRequest) -> AsyncIterator[ModelEvent]:
        body = request_body(request, self.model, self.max_tokens)
        open_stream = lambda: self.client.chat.completions.create(**body)  # noqa: E731
        return sdk_events(openai, open_stream, StreamAdapter(), exclude_none=True)
