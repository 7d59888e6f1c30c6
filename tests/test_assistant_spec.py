"""The assistant container's spec from `assistant:` and when a session still awaits its answer
(services/containers/assistants.py, pure)."""

from __future__ import annotations

import logging

import pytest

from baaaht.schemas.config import AssistantConfig
from baaaht.schemas.containers import Mount
from baaaht.schemas.sessions import Message, MessageMetadata
from baaaht.services.containers.assistants import assistant_spec, awaits_answer

AGENT_IMAGE = "baaaht/agent:abc123"


def test_the_default_assistant_runs_baaaht_agent_assistant_from_the_agent_image_read_only():
    spec = assistant_spec(AssistantConfig(), AGENT_IMAGE)
    assert (spec.image, spec.command, spec.args) == (AGENT_IMAGE, ["baaaht-agent"], ["assistant"])
    assert spec.read_only_rootfs is True
    assert spec.mounts == [] and spec.working_dir == ""
    # What the policy would fill is left to it: the hardened defaults are the policy's one source.
    assert (spec.user, spec.cap_drop, spec.security_opt, spec.network_mode) == ("", [], [], "")
    assert spec.env == {
        "BAAAHT_ASSISTANT_PROVIDER": "anthropic",
        "BAAAHT_ASSISTANT_MODEL": "claude-sonnet-4-5",
        "BAAAHT_ASSISTANT_MAX_TURNS": "20",
        "BAAAHT_ASSISTANT_MAX_TOOL_CALLS": "50",
        "BAAAHT_ASSISTANT_CONTEXT_BUDGET": "100000",
    }


def test_a_custom_image_command_args_workdir_and_route():
    config = AssistantConfig(
        image="example/assistant:2",
        command="python3",
        args=["-m", "my_assistant"],
        workdir="/srv",
        provider="openai",
        model="gpt-4o-mini",
        route="openai-eu",
    )
    spec = assistant_spec(config, AGENT_IMAGE)
    assert (spec.image, spec.command, spec.args, spec.working_dir) == (
        "example/assistant:2",
        ["python3"],
        ["-m", "my_assistant"],
        "/srv",
    )
    assert spec.env["BAAAHT_ASSISTANT_ROUTE"] == "openai-eu"
    assert spec.env["BAAAHT_ASSISTANT_PROVIDER"] == "openai"


def test_dev_mode_mounts_its_source_read_only_at_the_working_directory(caplog):
    config = AssistantConfig(dev_mode=True, dev_source="/home/me/baaaht", readonly_rootfs=False)
    with caplog.at_level(logging.WARNING, logger="baaaht.containers.assistants"):
        spec = assistant_spec(config, AGENT_IMAGE)
    assert spec.mounts == [Mount(type="bind", source="/home/me/baaaht", target="/app", read_only=True)]
    assert spec.working_dir == "/app" and spec.read_only_rootfs is False
    assert "writable root filesystem: a development exception" in caplog.text
    custom = assistant_spec(AssistantConfig(dev_mode=True, dev_source="/src", workdir="/code"), AGENT_IMAGE)
    assert custom.mounts[0].target == custom.working_dir == "/code"


def test_no_image_at_all_is_a_clear_error():
    with pytest.raises(ValueError, match="assistant.image and container.agent_image are both unset"):
        assistant_spec(AssistantConfig(), "")


def message(seq: int, role: str, **metadata) -> Message:
    return Message(
        id=f"m{seq}", seq=seq, time=float(seq), role=role, content="x", metadata=MessageMetadata(**metadata)
    )


def newest_first(*messages: Message) -> list[Message]:
    return sorted(messages, key=lambda m: m.seq, reverse=True)


def test_a_session_awaits_an_answer_until_a_turn_replying_to_its_newest_user_message_ended():
    assert not awaits_answer([])
    assert awaits_answer(newest_first(message(1, "user")))
    # The stored reply before a tool call did not end the turn: still waiting.
    started = message(2, "assistant", reply_to="m1", turn_id="t")
    assert awaits_answer(newest_first(message(1, "user"), started))
    ended = message(3, "assistant", reply_to="m1", turn_id="t", turn_end="failed")
    assert not awaits_answer(newest_first(message(1, "user"), started, ended))
    # A newer user message waits again, whatever came before.
    assert awaits_answer(newest_first(message(1, "user"), started, ended, message(4, "user")))
    assert not awaits_answer(newest_first(message(1, "system")))
