"""The assistant's settings, from the environment its supervisor sets (docs/ASSISTANT.md)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from baaaht.agent.settings import SettingsError

PROVIDERS = ("anthropic", "openai")
EGRESS_SOCKET = "/run/baaaht/agent/egress.sock"  # the egress proxy, in every agent container
# The path below http://egress/<route> each provider's SDK is given as its base URL.
BASE_PATHS = {"anthropic": "", "openai": "/v1"}
ENV = "BAAAHT_ASSISTANT_"


@dataclass(frozen=True)
class AssistantConfig:
    provider: str = "anthropic"
    model: str = "claude-sonnet-4-5"
    route: str = ""  # the egress route; "" = the provider's name
    max_turns: int = 20  # model calls per user message
    max_tool_calls: int = 50  # tool calls per user message
    context_budget: int = 100_000  # estimated tokens of conversation shown to the model
    max_tokens: int = 4096  # of one model answer
    retries: int = 3  # of a model call failing with 429, 5xx or a cut stream
    retry_delay: float = 1.0  # seconds before the first retry, doubled each time
    max_retry_delay: float = 30.0
    tool_timeout: float = 600.0  # seconds a tool call may take, queued and running
    egress_socket: str = EGRESS_SOCKET
    system_prompt: str = ""  # "" = the built-in one (agent/assistant/turns.py)

    def __post_init__(self) -> None:
        if self.provider not in PROVIDERS:
            raise SettingsError(f"{ENV}PROVIDER={self.provider!r}: expected one of {', '.join(PROVIDERS)}")
        if not self.model:
            raise SettingsError(f"{ENV}MODEL is empty: name the model, e.g. claude-sonnet-4-5 or gpt-4o")
        for name in ("max_turns", "max_tool_calls", "context_budget", "max_tokens"):
            if getattr(self, name) < 1:
                raise SettingsError(
                    f"{ENV}{name.upper()}={getattr(self, name)!r}: expected a whole number above 0"
                )
        if (
            self.retries < 0
            or self.retry_delay < 0
            or self.max_retry_delay < self.retry_delay
            or self.tool_timeout <= 0
        ):
            raise SettingsError(
                f"{ENV}RETRIES/RETRY_DELAY/MAX_RETRY_DELAY/TOOL_TIMEOUT: expected retries >= 0, "
                "0 <= retry delay <= max retry delay, tool timeout above 0"
            )

    @property
    def route_name(self) -> str:
        return self.route or self.provider

    @property
    def base_url(self) -> str:
        return f"http://egress/{self.route_name}{BASE_PATHS[self.provider]}"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "AssistantConfig":
        given: dict = {}
        for name, kind in cls.__annotations__.items():
            key = f"{ENV}{name.upper()}"
            if key not in environ:
                continue
            text = environ[key]
            try:
                given[name] = {"int": int, "float": float}.get(kind, str)(text)
            except ValueError:
                raise SettingsError(
                    f"{key}={text!r}: expected a {'whole number' if kind == 'int' else 'number'}"
                ) from None
        return cls(**given)
