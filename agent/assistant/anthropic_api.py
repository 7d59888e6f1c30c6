"""The Anthropic Messages API: our context as its request, its stream's events as ours.

`request_body` and `StreamAdapter` are pure (tested on scripted streams); `AnthropicModel` is the
official SDK, streaming through the egress proxy."""

from __future__ import annotations

import json
from typing import AsyncIterator

import anthropic

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


def _blocks(message: Message) -> tuple[str, list[dict]]:
    """(role, content blocks) of one stored message."""
    if message.role == "tool":
        result = {
            "type": "tool_result",
            "tool_use_id": message.metadata.tool_call_id,
            "content": message.content,
        }
        if message.metadata.is_error:
            result["is_error"] = True
        return "user", [result]
    if message.role == "assistant":
        blocks = [{"type": "text", "text": message.content}] if message.content else []
        blocks += [
            {"type": "tool_use", "id": c.id, "name": c.name, "input": arguments_object(c.arguments)}
            for c in message.metadata.tool_calls
        ]
        return "assistant", blocks
    return "user", [{"type": "text", "text": user_text(message)}]


def arguments_object(arguments: str) -> dict:
    """A stored call's arguments as the object both APIs take back ({} for what is not one)."""
    try:
        found = json.loads(arguments or "{}")
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


def request_body(request: ModelRequest, model: str, max_tokens: int) -> dict:
    """The Messages API request (streamed), consecutive messages of one role merged into one."""
    messages: list[dict] = []
    for message in every_call_answered(request.messages):
        role, blocks = _blocks(message)
        if not blocks:
            continue
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"].extend(blocks)
        else:
            messages.append({"role": role, "content": blocks})
    body = {"model": model, "max_tokens": max_tokens, "messages": messages, "stream": True}
    if request.system:
        body["system"] = request.system
    if request.tools:
        body["tools"] = request.tools
    return body


class StreamAdapter:
    """Feed it the stream's events (as dicts) in order; it answers each with our events."""

    def __init__(self) -> None:
        self._tools: dict[int, dict] = {}  # block index -> {id, name, json}
        self._stop_reason = ""
        self._input_tokens = self._output_tokens = 0
        self.finished = False
        self.started = False  # any event came

    def feed(self, event: dict) -> list[ModelEvent]:
        self.started = True
        kind = event.get("type")
        if kind == "message_start":
            self._input_tokens = ((event.get("message") or {}).get("usage") or {}).get("input_tokens") or 0
        elif kind == "content_block_start":
            block = event.get("content_block") or {}
            if block.get("type") == "tool_use":
                self._tools[event["index"]] = {"id": block["id"], "name": block["name"], "json": ""}
        elif kind == "content_block_delta":
            delta = event.get("delta") or {}
            if delta.get("type") == "text_delta" and delta.get("text"):
                return [TextDelta(delta["text"])]
            if delta.get("type") == "input_json_delta" and event.get("index") in self._tools:
                self._tools[event["index"]]["json"] += delta.get("partial_json", "")
        elif kind == "content_block_stop" and event.get("index") in self._tools:
            tool = self._tools.pop(event["index"])
            return [
                ToolCallReady(
                    MessageToolCall(id=tool["id"], name=tool["name"], arguments=tool["json"] or "{}")
                )
            ]
        elif kind == "message_delta":
            self._stop_reason = (event.get("delta") or {}).get("stop_reason") or self._stop_reason
            self._output_tokens = (event.get("usage") or {}).get("output_tokens") or self._output_tokens
        elif kind == "message_stop":
            self.finished = True
            return [Finished(self._stop_reason or "end_turn", self._input_tokens, self._output_tokens)]
        return []

    def end(self) -> list[ModelEvent]:
        """The stream is over: ProviderError `cut` if the model had not finished."""
        if not self.finished:
            raise ProviderError("cut", "the anthropic stream ended before the model finished its answer")
        return []


class AnthropicModel:
    provider = "anthropic"

    def __init__(self, client: anthropic.AsyncAnthropic, model: str, route: str, max_tokens: int):
        self.client, self.model, self.route, self.max_tokens = client, model, route, max_tokens

    def stream(self, request: ModelRequest) -> AsyncIterator[ModelEvent]:
        body = request_body(request, self.model, self.max_tokens)
        return sdk_events(anthropic, lambda: self.client.messages.create(**body), StreamAdapter())
