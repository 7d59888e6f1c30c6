"""The `assistant:` section and the seed's --assistant-* flags of baaaht-orchestrator (pure logic)."""

from __future__ import annotations

import pytest

from baaaht.common.config import ConfigError, load_config
from baaaht.host.launcher import build_parser, comma_list, flags_from


def config_from(argv: list[str] = (), env: dict[str, str] | None = None):
    return load_config(None, env=env or {}, flags=flags_from(build_parser().parse_args(list(argv))))


def test_the_defaults_are_hardened_and_autostarted():
    config, _sources = config_from()
    assistant = config.assistant
    assert assistant.autostart is True
    assert assistant.readonly_rootfs is True
    assert assistant.dev_mode is False
    assert (assistant.image, assistant.command, assistant.args) == ("", "baaaht-agent", ["assistant"])


def test_each_seed_flag_sets_its_key():
    config, sources = config_from(
        [
            "--assistant-autostart=false",
            "--assistant-image",
            "example/assistant:1",
            "--assistant-command",
            "sh",
            '--assistant-args=-lc,"pip list, then sleep"',
            "--assistant-workdir",
            "/app",
            "--assistant-dev-mode",
            "--assistant-dev-source",
            "/srv/src",
            "--assistant-readonly-rootfs=false",
        ]
    )
    assistant = config.assistant
    assert assistant.autostart is False
    assert assistant.image == "example/assistant:1"
    assert assistant.command == "sh"
    assert assistant.args == ["-lc", "pip list, then sleep"]
    assert assistant.workdir == "/app"
    assert assistant.dev_mode is True
    assert assistant.dev_source == "/srv/src"
    assert assistant.readonly_rootfs is False
    assert sources["assistant.autostart"] == sources["assistant.args"] == "flag"


def test_a_bare_boolean_flag_is_true_and_a_bad_value_is_refused():
    config, _ = config_from(["--assistant-autostart"])
    assert config.assistant.autostart is True
    with pytest.raises(ConfigError, match=r"assistant\.autostart: 'maybe' is not a boolean"):
        config_from(["--assistant-autostart=maybe"])


def test_comma_lists_follow_csv_quoting():
    assert comma_list("") == []
    assert comma_list("a,b") == ["a", "b"]
    assert comma_list('-lc,"x, y"') == ["-lc", "x, y"]


def test_environment_overrides_with_the_orchestrator_prefix():
    config, sources = config_from(
        env={
            "ORCHESTRATOR_ASSISTANT__AUTOSTART": "false",
            "ORCHESTRATOR_ASSISTANT__ARGS": '["assistant", "--verbose"]',
            "ORCHESTRATOR_ASSISTANT__MODEL": "gpt-4o-mini",
            "ORCHESTRATOR_ASSISTANT__PROVIDER": "openai",
        }
    )
    assert config.assistant.autostart is False
    assert config.assistant.args == ["assistant", "--verbose"]
    assert (config.assistant.provider, config.assistant.model) == ("openai", "gpt-4o-mini")
    assert sources["assistant.autostart"] == "env:ORCHESTRATOR_ASSISTANT__AUTOSTART"


def test_a_flag_beats_the_environment():
    config, _ = config_from(["--assistant-autostart"], env={"ORCHESTRATOR_ASSISTANT__AUTOSTART": "false"})
    assert config.assistant.autostart is True


def test_a_writable_root_filesystem_is_refused_without_dev_mode():
    with pytest.raises(ConfigError) as refused:
        config_from(["--assistant-readonly-rootfs=false"])
    assert refused.value.problems == [
        "assistant.readonly_rootfs: 'false' is refused without assistant.dev_mode (a writable root "
        "filesystem is a development-only exception: set assistant.dev_mode too, or leave readonly_rootfs "
        "true); from flag"
    ]


def test_dev_mode_needs_its_source_directory():
    with pytest.raises(ConfigError, match=r"assistant\.dev_mode: 'true' needs assistant\.dev_source"):
        config_from(["--assistant-dev-mode"])


def test_a_relative_dev_source_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config, _ = config_from(["--assistant-dev-mode", "--assistant-dev-source", "src"])
    assert config.assistant.dev_source == str(tmp_path / "src")


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        (["--assistant-command", " "], r"assistant\.command: ' ' is empty"),
        (["--assistant-workdir", "app"], r"assistant\.workdir: 'app' is not an absolute path"),
        (["--set", "assistant.max_turns=0"], r"assistant\.max_turns: '0' is out of range"),
        (["--set", "assistant.provider=gemini"], r"assistant\.provider: 'gemini' is not one of anthropic"),
    ],
)
def test_bad_values_are_refused_naming_the_key(argv, problem):
    with pytest.raises(ConfigError, match=problem):
        config_from(argv)
