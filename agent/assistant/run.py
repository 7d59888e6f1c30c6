"""`baaaht-agent assistant`: the assistant of the one session its container's identity names."""

from __future__ import annotations

import logging

from baaaht.agent.assistant.clients import model_for
from baaaht.agent.assistant.config import AssistantConfig
from baaaht.agent.assistant.tools import SchedulerTools
from baaaht.agent.assistant.turns import Assistant
from baaaht.agent.sdk import Agent
from baaaht.agent.settings import SettingsError
from baaaht.bus.authorize import ASSISTANT
from baaaht.schemas.bus import BusPing

log = logging.getLogger("baaaht.agent.assistant")


async def assistant(agent: Agent, config: AssistantConfig) -> None:
    """Serve the session the broker says this connection is the assistant of (its identity: the
    assistant never names its session itself, so it cannot pick another)."""
    caller = (await agent.call(BusPing())).caller
    if caller.role != ASSISTANT or not caller.session:
        raise SettingsError(
            f"this container's identity is role {caller.role or 'none'!r}, session "
            f"{caller.session or 'none'!r}: an assistant runs in a container the container manager "
            "started as a session's assistant"
        )
    log.info(
        "serving",
        extra={
            "session_id": caller.session,
            "provider": config.provider,
            "model": config.model,
            "route": config.route_name,
        },
    )
    model = model_for(config)
    tools = SchedulerTools(agent, caller.session, config.tool_timeout)
    await Assistant(agent, caller.session, model, tools, config).serve()
