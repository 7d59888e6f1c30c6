"""The configured provider's official SDK, pointed at the egress proxy over its unix socket.

The SDK's own retries are off: the turn loop retries (bounded, and visible in the session)."""

from __future__ import annotations

import anthropic
import httpx2
import openai

from baaaht.agent.assistant.anthropic_api import AnthropicModel
from baaaht.agent.assistant.config import AssistantConfig
from baaaht.agent.assistant.model import Model
from baaaht.agent.assistant.openai_api import OpenAIModel

# The SDKs insist on a key; the proxy drops whatever is sent and adds the real one on the host.
PLACEHOLDER_KEY = "held-by-the-egress-proxy"
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 300.0  # between two chunks of a stream (a model thinking before its first token)


def model_for(config: AssistantConfig) -> Model:
    http = httpx2.AsyncClient(
        transport=httpx2.AsyncHTTPTransport(uds=config.egress_socket),
        timeout=httpx2.Timeout(READ_TIMEOUT, connect=CONNECT_TIMEOUT),
    )
    settings = {
        "base_url": config.base_url,
        "api_key": PLACEHOLDER_KEY,
        "http_client": http,
        "max_retries": 0,
    }
    if config.provider == "anthropic":
        return AnthropicModel(
            anthropic.AsyncAnthropic(**settings), config.model, config.route_name, config.max_tokens
        )
    return OpenAIModel(openai.AsyncOpenAI(**settings), config.model, config.route_name, config.max_tokens)
