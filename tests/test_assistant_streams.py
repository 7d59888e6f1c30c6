"""The provider adapters (pure): our context as each API's request, each API's stream as our events,
and error answers classified (the egress proxy's refusals told apart from the provider's)."""

from __future__ import annotations

import pytest

from baaaht.agent.assistant import anthropic_api, openai_api
from baaaht.agent.assistant.context import EMPTY_MESSAGE
from baaaht.agent.assistant.model import (
    Finished,
    ModelRequest,
    ProviderError,
    TextDelta,
    ToolCallReady,
    status_error,
)
from baaaht.schemas.sessions import Message, MessageMetadata, MessageToolCall
from baaaht.schemas.tools import tool_schemas

READ = MessageToolCall(id="c1", name="read_file", arguments='{"path": "notes.txt"}')


def msg(seq: int, role: str, content: str, **metadata) -> Message:
    return Message(
        id=f"m{seq}", seq=seq, time=0.0, role=role, content=content, metadata=MessageMetadata(**metadata)
    )


CONVERSATION = [
    msg(1, "user", "what is in notes.txt?"),
    msg(2, "system", "the workspace was restored"),
    msg(3, "assistant", "Let me look.", tool_calls=[READ]),
    msg(4, "tool", '{"content": "first line"}', tool_call_id="c1", tool_name="read_file"),
]


def test_anthropic_request_merges_roles_and_answers_tool_use_with_tool_result():
    body = anthropic_api.request_body(ModelRequest("be brief", CONVERSATION, tool_schemas()), "claude-x", 99)
    assert body["system"] == "be brief" and body["stream"] is True and body["max_tokens"] == 99
    assert [t["name"] for t in body["tools"]][:2] == ["read_file", "write_file"]
    assert body["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is in notes.txt?"},
                {"type": "text", "text": "[system message] the workspace was restored"},
            ],
        },
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me look."},
                {"type": "tool_use", "id": "c1", "name": "read_file", "input": {"path": "notes.txt"}},
            ],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "c1", "content": '{"content": "first line"}'}],
        },
    ]


def test_openai_request_has_function_tools_and_tool_messages():
    body = openai_api.request_body(ModelRequest("be brief", CONVERSATION, tool_schemas()), "gpt-x", 99)
    assert body["stream_options"] == {"include_usage": True} and body["max_completion_tokens"] == 99
    tool = body["tools"][0]
    assert tool["type"] == "function" and tool["function"]["name"] == "read_file"
    assert tool["function"]["parameters"]["required"] == ["path"]
    assert body["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "what is in notes.txt?"},
        {"role": "user", "content": "[system message] the workspace was restored"},
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "read_file", "arguments": '{"path": "notes.txt"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": '{"content": "first line"}'},
    ]


# A Messages API stream as the SDK hands it over (text, then a tool call in two JSON pieces).
ANTHROPIC_STREAM = [
    {"type": "message_start", "message": {"id": "msg_1", "usage": {"input_tokens": 30, "output_tokens": 1}}},
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Let me "}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "look."}},
    {"type": "content_block_stop", "index": 0},
    {
        "type": "content_block_start",
        "index": 1,
        "content_block": {"type": "tool_use", "id": "toolu_9", "name": "read_file", "input": {}},
    },
    {
        "type": "content_block_delta",
        "index": 1,
        "delta": {"type": "input_json_delta", "partial_json": '{"path": "no'},
    },
    {
        "type": "content_block_delta",
        "index": 1,
        "delta": {"type": "input_json_delta", "partial_json": 'tes.txt"}'},
    },
    {"type": "content_block_stop", "index": 1},
    {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 17}},
    {"type": "message_stop"},
]


def test_anthropic_stream_becomes_text_then_a_complete_tool_call_then_finished():
    adapter = anthropic_api.StreamAdapter()
    events = [e for event in ANTHROPIC_STREAM for e in adapter.feed(event)]
    adapter.end()
    assert events == [
        TextDelta("Let me "),
        TextDelta("look."),
        ToolCallReady(MessageToolCall(id="toolu_9", name="read_file", arguments='{"path": "notes.txt"}')),
        Finished("tool_use", 30, 17),
    ]


def test_an_anthropic_stream_ending_before_message_stop_is_a_cut():
    adapter = anthropic_api.StreamAdapter()
    for event in ANTHROPIC_STREAM[:4]:
        adapter.feed(event)
    with pytest.raises(ProviderError) as cut:
        adapter.end()
    assert cut.value.kind == "cut" and cut.value.retryable


def chunk(delta: dict, finish: str | None = None) -> dict:
    return {
        "id": "c",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


OPENAI_STREAM = [
    chunk({"role": "assistant", "content": ""}),
    chunk({"content": "Let me "}),
    chunk({"content": "look."}),
    chunk(
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": "call_a",
                    "type": "function",
                    "function": {"name": "read_file", "arguments": '{"pa'},
                }
            ]
        }
    ),
    chunk(
        {
            "tool_calls": [
                {
                    "index": 1,
                    "id": "call_b",
                    "type": "function",
                    "function": {"name": "glob", "arguments": ""},
                }
            ]
        }
    ),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'th": "notes.txt"}'}}]}),
    chunk({"tool_calls": [{"index": 1, "function": {"arguments": '{"pattern": "*"}'}}]}),
    chunk({}, "tool_calls"),
    {"id": "c", "choices": [], "usage": {"prompt_tokens": 30, "completion_tokens": 17, "total_tokens": 47}},
]


def test_openai_stream_assembles_interleaved_tool_calls_by_index():
    adapter = openai_api.StreamAdapter()
    events = [e for c in OPENAI_STREAM for e in adapter.feed(c)] + adapter.end()
    assert events == [
        TextDelta("Let me "),
        TextDelta("look."),
        ToolCallReady(MessageToolCall(id="call_a", name="read_file", arguments='{"path": "notes.txt"}')),
        ToolCallReady(MessageToolCall(id="call_b", name="glob", arguments='{"pattern": "*"}')),
        Finished("tool_calls", 30, 17),
    ]


def test_an_openai_stream_without_a_finish_reason_is_a_cut():
    adapter = openai_api.StreamAdapter()
    for c in OPENAI_STREAM[:3]:
        adapter.feed(c)
    with pytest.raises(ProviderError) as cut:
        adapter.end()
    assert cut.value.kind == "cut"


PROXY_REFUSAL = {
    "error": {"type": "egress_refused", "refused": "route", "message": "no route 'anthropic' (open: none)"}
}


@pytest.mark.parametrize(
    ("status", "body", "kind", "retryable"),
    [
        (404, PROXY_REFUSAL, "refused", False),
        (
            503,
            {"error": {"type": "egress_refused", "refused": "credential", "message": "m"}},
            "refused",
            False,
        ),
        (404, PROXY_REFUSAL["error"], "refused", False),  # the openai SDK hands over the inner object
        (401, {"type": "error", "error": {"type": "authentication_error"}}, "auth", False),
        (429, {"type": "error", "error": {"type": "rate_limit_error"}}, "rate_limit", True),
        (500, None, "server", True),
        (529, {"type": "error", "error": {"type": "overloaded_error"}}, "server", True),
        (400, {"error": {"type": "invalid_request_error"}}, "bad_request", False),
        (200, {"type": "error", "error": {"type": "overloaded_error"}}, "server", True),  # inside a stream
        (200, {"type": "rate_limit_exceeded", "message": "m"}, "rate_limit", True),
        (200, {"type": "error", "error": {"type": "invalid_request_error"}}, "bad_request", False),
    ],
)
def test_error_answers_are_classified(status, body, kind, retryable):
    error = status_error(status, body, "message")
    assert (error.kind, error.retryable, error.status) == (kind, retryable, status)


def test_a_proxy_refusal_names_what_was_refused_and_keeps_the_proxys_message():
    error = status_error(404, PROXY_REFUSAL, "Error code: 404")
    assert error.refused == "route" and str(error) == "no route 'anthropic' (open: none)"


def test_an_empty_user_message_is_never_an_empty_text_block():
    body = anthropic_api.request_body(ModelRequest("", [msg(1, "user", "")], []), "claude-x", 10)
    assert body["messages"] == [{"role": "user", "content": [{"type": "text", "text": EMPTY_MESSAGE}]}]
    assert "system" not in body and "tools" not in body
