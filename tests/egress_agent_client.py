"""What an agent runs to reach the LLM APIs through the egress proxy with the stock SDKs.

Standalone (the SDKs, the standard library and baaaht's agent package), so it runs inside an agent
container as it does on the host:

    python egress_agent_client.py /run/baaaht/agent/egress.sock [rejected]

prints one JSON object: the text and usage each SDK got, streamed and not, and what plain `httpx` and
`http.client` got with the documented base URL; with `rejected` (the upstream refuses the key), the
error each client saw. The SDKs need some api_key: the placeholder never leaves the proxy, which drops
it and adds the real key.
"""

from __future__ import annotations

import json
import sys

import anthropic
import httpx
import httpx2
import openai

from baaaht.agent.unix_http import UnixHTTPConnection

PLACEHOLDER_KEY = "held-by-the-egress-proxy"


BASE_URL = "http://egress"  # the host part is not used: the transport connects to the socket
MESSAGE = {"model": "claude-fake", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}


def plain(socket_path: str) -> dict:
    """The same Messages call with plain httpx (streamed) and with the standard library."""
    found = {}
    with httpx.Client(transport=httpx.HTTPTransport(uds=socket_path), base_url=BASE_URL) as client:
        with client.stream("POST", "/anthropic/v1/messages", json={**MESSAGE, "stream": True}) as reply:
            deltas = [
                json.loads(line[len("data: ") :])["delta"].get("text", "")
                for line in reply.iter_lines()
                if line.startswith("data: ") and '"content_block_delta"' in line
            ]
        found["httpx_stream"] = {"status": reply.status_code, "text": "".join(deltas)}
    connection = UnixHTTPConnection(socket_path)
    try:
        connection.request(
            "POST",
            "/anthropic/v1/messages",
            body=json.dumps(MESSAGE),
            headers={"Content-Type": "application/json"},
        )
        response = connection.getresponse()
        body = json.loads(response.read())
        found["http_client"] = {"status": response.status, "text": body["content"][0]["text"]}
    finally:
        connection.close()
    return found


def rejected(socket_path: str) -> dict:
    """What each client shows of an upstream that refuses the key (and quotes it)."""
    found = {}
    with anthropic.Anthropic(
        base_url=f"{BASE_URL}/anthropic",
        api_key=PLACEHOLDER_KEY,
        http_client=httpx2.Client(transport=httpx2.HTTPTransport(uds=socket_path)),
        max_retries=0,
    ) as claude:
        try:
            claude.messages.create(**MESSAGE)
        except anthropic.APIStatusError as error:
            found["anthropic"] = {
                "status": error.status_code,
                "error": str(error),
                "headers": dict(error.response.headers),
            }
    with httpx.Client(transport=httpx.HTTPTransport(uds=socket_path), base_url=BASE_URL) as client:
        reply = client.post("/openai/v1/chat/completions", json={"model": "gpt-fake", "messages": []})
        found["httpx"] = {"status": reply.status_code, "body": reply.text, "headers": dict(reply.headers)}
    return found


def run(socket_path: str) -> dict:
    def http_client() -> httpx2.Client:
        return httpx2.Client(transport=httpx2.HTTPTransport(uds=socket_path))

    found: dict = {}
    with (
        anthropic.Anthropic(
            base_url=f"{BASE_URL}/anthropic",
            api_key=PLACEHOLDER_KEY,
            http_client=http_client(),
            max_retries=0,
        ) as claude,
        openai.OpenAI(
            base_url=f"{BASE_URL}/openai/v1",
            api_key=PLACEHOLDER_KEY,
            http_client=http_client(),
            max_retries=0,
        ) as gpt,
    ):
        _anthropic(claude, found)
        _openai(gpt, found)
    return {**found, **plain(socket_path)}


def _anthropic(claude: anthropic.Anthropic, found: dict) -> None:
    message = claude.messages.create(**MESSAGE)
    found["anthropic"] = {"text": message.content[0].text, "output_tokens": message.usage.output_tokens}
    with claude.messages.stream(**MESSAGE) as stream:
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
    mode = sys.argv[2] if len(sys.argv) > 2 else "calls"
    print(json.dumps(rejected(sys.argv[1]) if mode == "rejected" else run(sys.argv[1])), flush=True)
