"""The session's assistant as the container manager starts it (pure rules; docs/ASSISTANT.md).

One assistant container per session, started on the session's user message when `assistant.autostart`
is on, from `assistant.image` (the agent image by default) running `assistant.command` and `args`. Its
spec leaves the hardening to the policy's defaults (non-root user, no-new-privileges, every capability
dropped, no network, a read-only root filesystem), like every agent's; the policy judges it like any
request. Dev mode bind-mounts `assistant.dev_source` read-only at the working directory, under the
policy's mount rules; only dev mode may turn the read-only root filesystem off (common/config_rules.py),
a documented exception logged at every start.
"""

from __future__ import annotations

import logging
from typing import Iterable, Iterator, Protocol

from baaaht.bus.peers import Calls, Peer
from baaaht.schemas.config import AssistantConfig
from baaaht.schemas.containers import ContainerSpec, Mount
from baaaht.schemas.sessions import Message, SessionState

log = logging.getLogger("baaaht.containers.assistants")

ASSISTANT = "assistant"
DEV_WORKDIR = "/app"  # where dev mode mounts its source when assistant.workdir is unset
ENV_PREFIX = "BAAAHT_ASSISTANT_"
PAGE = 1000  # sessions per session.list page
RECENT = 50  # newest messages looked at: the newest user message and what answers it are among them


def assistant_env(config: AssistantConfig) -> dict[str, str]:
    """What `baaaht-agent assistant` reads (agent/assistant/config.py): provider, model, route (unset: the
    provider's name) and its caps."""
    values = {
        "provider": config.provider,
        "model": config.model,
        "route": config.route,
        "max_turns": config.max_turns,
        "max_tool_calls": config.max_tool_calls,
        "context_budget": config.context_budget,
    }
    return {f"{ENV_PREFIX}{key.upper()}": str(value) for key, value in values.items() if value != ""}


def assistant_spec(config: AssistantConfig, agent_image: str) -> ContainerSpec:
    """The assistant container's spec, before the policy fills its hardened defaults and judges it."""
    image = config.image or agent_image
    if not image:
        raise ValueError(
            "no assistant image: assistant.image and container.agent_image are both unset (`make images` "
            "builds the agent image; --assistant-image names another)"
        )
    workdir = config.workdir
    mounts: list[Mount] = []
    if config.dev_mode:
        workdir = workdir or DEV_WORKDIR
        mounts.append(Mount(type="bind", source=config.dev_source, target=workdir, read_only=True))
    if not config.readonly_rootfs:
        log.warning(
            "the assistant runs with a writable root filesystem: a development exception of dev mode "
            "(assistant.readonly_rootfs false), never for production",
            extra={"dev_source": config.dev_source},
        )
    return ContainerSpec(
        image=image,
        command=[config.command],
        args=list(config.args),
        working_dir=workdir,
        env=assistant_env(config),
        mounts=mounts,
        read_only_rootfs=config.readonly_rootfs,
    )


def awaits_answer(newest_first: list[Message]) -> bool:
    """Whether the newest user message of a conversation (its newest page, newest first) has no answer
    yet: no message replying to it ended its turn. The assistant answers in order, so the newest tells."""
    answered = {m.metadata.reply_to for m in newest_first if m.metadata.turn_end}
    newest_user = next((m for m in newest_first if m.role == "user"), None)
    return newest_user is not None and newest_user.id not in answered


class Conversations(Protocol):
    def awaiting_answer(self) -> Iterable[str]:
        """Ids of active sessions whose newest user message has no answer yet; raises BusError when the
        session service cannot be asked."""


class BusConversations:
    """The session service, asked which active sessions await their assistant's answer (after a restart
    of the host, messages that came while no assistant ran)."""

    def __init__(self, bus: Calls, timeout: float):
        self.sessions = Peer(bus, "session", timeout=timeout)

    def awaiting_answer(self) -> Iterator[str]:
        cursor = 0
        while True:
            page = self.sessions.list(None, states=[SessionState.ACTIVE], limit=PAGE, cursor=cursor)
            for session in page.sessions:
                recent = self.sessions.messages(None, session_id=session.id, order="newest", limit=RECENT)
                if awaits_answer(recent.messages):
                    yield session.id
            if not (cursor := page.next_cursor):
                return
