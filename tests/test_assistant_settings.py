"""The assistant's settings from its environment (pure): what is read, what is refused by name."""

from __future__ import annotations

import pytest

from baaaht.agent.assistant.config import AssistantConfig
from baaaht.agent.main import EXIT_SETTINGS, main
from baaaht.agent.settings import SettingsError


def test_settings_are_read_from_the_environment_and_name_the_egress_route():
    config = AssistantConfig.from_env(
        {
            "BAAAHT_ASSISTANT_PROVIDER": "openai",
            "BAAAHT_ASSISTANT_MODEL": "gpt-x",
            "BAAAHT_ASSISTANT_ROUTE": "llm",
            "BAAAHT_ASSISTANT_MAX_TURNS": "3",
            "BAAAHT_ASSISTANT_CONTEXT_BUDGET": "5000",
            "BAAAHT_ASSISTANT_RETRY_DELAY": "0.5",
        }
    )
    assert (config.provider, config.model, config.max_turns, config.context_budget) == (
        "openai",
        "gpt-x",
        3,
        5000,
    )
    assert config.retry_delay == 0.5 and config.base_url == "http://egress/llm/v1"
    assert (
        AssistantConfig.from_env({}).base_url == "http://egress/anthropic"
    )  # the route: the provider's name


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"BAAAHT_ASSISTANT_PROVIDER": "gemini"}, "BAAAHT_ASSISTANT_PROVIDER='gemini'"),
        ({"BAAAHT_ASSISTANT_MAX_TOOL_CALLS": "many"}, "BAAAHT_ASSISTANT_MAX_TOOL_CALLS='many'"),
        ({"BAAAHT_ASSISTANT_MAX_TURNS": "0"}, "BAAAHT_ASSISTANT_MAX_TURNS=0"),
        ({"BAAAHT_ASSISTANT_MODEL": ""}, "BAAAHT_ASSISTANT_MODEL is empty"),
    ],
)
def test_a_bad_setting_is_refused_by_name(environ, named):
    with pytest.raises(SettingsError) as refused:
        AssistantConfig.from_env(environ)
    assert named in str(refused.value)


def test_baaaht_agent_assistant_exits_with_the_settings_status_before_joining(monkeypatch, capsys):
    monkeypatch.setenv("BAAAHT_BUS", "ipc:///nowhere/bus.sock")
    monkeypatch.setenv("BAAAHT_ASSISTANT_PROVIDER", "gemini")
    with pytest.raises(SystemExit) as exited:
        main(["assistant"])
    assert (
        exited.value.code == EXIT_SETTINGS and "expected one of anthropic, openai" in capsys.readouterr().err
    )
