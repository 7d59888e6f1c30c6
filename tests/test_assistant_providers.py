"""The assistant's providers through the official SDKs against the fake LLM on loopback (TLS, its
test CA), both APIs: a scripted tool call streamed, and each failure classified as the loop needs."""

from __future__ import annotations

import ssl
import subprocess
import sys
from types import SimpleNamespace

import anthropic
import httpx2
import msgspec
import openai
import pytest

from baaaht.agent.assistant.anthropic_api import AnthropicModel
from baaaht.agent.assistant.model import Finished, ModelRequest, ProviderError, TextDelta, ToolCallReady
from baaaht.agent.assistant.openai_api import OpenAIModel
from baaaht.bus.testing import run_async
from baaaht.bus.testing.fake_llm import FakeLLM, call_tool, cut, fail, say, say_tool_result, stream_error
from baaaht.schemas.sessions import Message, MessageMetadata, MessageToolCall

QUESTION = Message(id="m1", seq=1, time=0.0, role="user", content="what is in notes.txt?")


def model_on(upstream: FakeLLM, provider: str):
    http = httpx2.AsyncClient(verify=ssl.create_default_context(cafile=upstream.ca_file))
    settings = {"api_key": "placeholder", "http_client": http, "max_retries": 0}
    if provider == "anthropic":
        return AnthropicModel(
            anthropic.AsyncAnthropic(base_url=upstream.url, **settings), "claude-x", "r", 100
        )
    return OpenAIModel(openai.AsyncOpenAI(base_url=upstream.url + "/v1", **settings), "gpt-x", "r", 100)


def events_of(upstream: FakeLLM, provider: str, messages=(QUESTION,)) -> list:
    """The model's events for one request, its client closed after."""

    async def ask():
        model = model_on(upstream, provider)
        try:
            return [e async for e in model.stream(ModelRequest("sys", list(messages), []))]
        finally:
            await model.client.close()

    return run_async(ask(), timeout=30)


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
def test_a_scripted_tool_call_then_an_answer_from_its_result(provider, tmp_path):
    script = [
        [say("Let me look."), call_tool("read_file", "call_1", path="notes.txt")],
        [say_tool_result("content", 1)],
    ]
    with FakeLLM(tmp_path, script=script) as upstream:
        first = events_of(upstream, provider)
        assert [e.text for e in first if isinstance(e, TextDelta)] == ["Let ", "me ", "look."]
        (ready,) = [e for e in first if isinstance(e, ToolCallReady)]
        assert ready.call == MessageToolCall(id="call_1", name="read_file", arguments='{"path":"notes.txt"}')
        assert isinstance(first[-1], Finished) and first[-1].stop_reason in ("tool_use", "tool_calls")
        asked = Message(
            id="m2",
            seq=2,
            time=0.0,
            role="assistant",
            content="",
            metadata=MessageMetadata(tool_calls=[ready.call]),
        )
        result = Message(
            id="m3",
            seq=3,
            time=0.0,
            role="tool",
            content='{"content": "line one\\nline two"}',
            metadata=MessageMetadata(tool_call_id="call_1"),
        )
        second = events_of(upstream, provider, [QUESTION, asked, result])
        assert "".join(e.text for e in second if isinstance(e, TextDelta)) == "line one"


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
@pytest.mark.parametrize(
    ("step", "kind", "status"),
    [
        (fail(429), "rate_limit", 429),
        (fail(500), "server", 500),
        (fail(401), "auth", 401),
        (stream_error("overloaded_error"), "server", 200),
        (cut(), "cut", 0),
    ],
)
def test_failures_are_classified(provider, step, kind, status, tmp_path):
    with FakeLLM(tmp_path, script=[[say("Partly"), step] if "fail" not in step else [step]]) as upstream:
        with pytest.raises(ProviderError) as failed:
            events_of(upstream, provider)
    assert (failed.value.kind, failed.value.status) == (kind, status)


def test_the_fake_llm_in_its_own_process_follows_a_script_file(tmp_path):
    script = tmp_path / "script.json"
    script.write_bytes(msgspec.json.encode([[say("from the file"), call_tool("glob", "g1", pattern="*")]]))
    argv = [
        sys.executable,
        "-m",
        "baaaht.bus.testing.fake_llm",
        str(tmp_path / "llm"),
        "--script",
        str(script),
    ]
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as process:
        try:
            url = process.stdout.readline().strip()  # printed once it serves
            assert url.startswith("https://127.0.0.1:")
            upstream = SimpleNamespace(url=url, ca_file=str(tmp_path / "llm" / "ca.pem"))
            events = events_of(upstream, "openai")
        finally:
            process.stdin.close()  # it runs until its stdin ends
            process.wait(timeout=30)
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "from the file"
    assert [e.call for e in events if isinstance(e, ToolCallReady)] == [
        MessageToolCall(id="g1", name="glob", arguments='{"pattern":"*"}')
    ]
    assert process.returncode == 0
