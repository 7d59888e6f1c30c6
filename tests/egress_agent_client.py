"""What an agent runs to reach the LLM APIs through the egress proxy with the stock SDKs.

Standalone (only the SDKs), so it runs inside an agent container as it does on the host:

    python egress_agent_client.py /run/baaaht/agent/egress.sock

prints one JSON object: the text and usage each SDK got, streamed and not. The SDKs need some
api_key: the placeholder never leaves the proxy, which drops it and adds the real key.
"""

from __future__ import annotations

import json
import sys

import anthropic
import httpx2
import openai

PLACEHOLDER_KEY = "held-by-the-egress-proxy"


def run(socket_path: str) -> dict:
    def http_client() -> httpx2.Client:
        return httpx2.Client(transport=httpx2.HTTPTransport(uds=socket_path))

    found: dict = {}
    with (
        anthropic.Anthropic(
            base_url="http://egress/anthropic",
            api_key=PLACEHOLDER_KEY,
            http_client=http_client(),
            max_retries=0,
        ) as claude,
        openai.OpenAI(
            base_url="http://egress/openai/v1",
            api_key=PLACEHOLDER_KEY,
            http_client=http_client(),
            max_retries=0,
        ) as gpt,
    ):
        _anthropic(claude, found)
        _openai(gpt, found)
    return found


def _anthropic(claude: anthropic.Anthropic, found: dict) -> None:
    message = claude.messages.create(
        model="claude-fake", max_tokens=50, messages=[{"role": "user", "content": "hi"}]
    )
    found["anthropic"] = {"text": message.content[0].text, "output_tokens": message.usage.output_tokens}
    with claude.messages.stream(
        model="claude-fake", max_tokens=50, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    found["anthropic_stream"] = {"text": text, "output_tokens": final.usage.output_tokens}


def _openai(gpt: openai.OpenAI, found: dict) -> None:
    completion = gpt.chat.completions.create(model="gpt-fake", messages=[{"role": "user", "content": "hi"}])
    found["openai"] = {
        "text": completion.choices[0].message.content,
        "output_tokens": completion.usage.completion_tokens,
    }
    chunks = gpt.chat.completions.create(
        model="gpt-fake", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    text, usage = "", None
    for chunk in chunks:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        usage = chunk.usage or usage
    found["openai_stream"] = {"text": text, "output_tokens": usage.completion_tokens if usage else None}
    try:
        gpt.models.list()  # a GET: the openai route allows POST only
    except openai.APIStatusError as error:  # the proxy's own refusal body
        found["refused"] = {"status": error.status_code, "body": error.response.json()}


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1])), flush=True)
