"""The agent SDK: what a process inside an agent container runs to join the bus.

    from baaaht.agent import Agent

    async def main() -> None:
        async with Agent.from_env() as agent:           # BAAAHT_BUS, set by the container manager
            info = await agent.call(SessionGet(session_id=...))
            async for chunk in agent.stream(ContainerLogs(...)):
                ...
            await agent.publish(SomeAgentEvent(...))
            await agent.stopped()                       # SIGTERM, or the bus lost for too long

The connection is the host clients' (bus/aio.py over bus/connection.py): the same heartbeats, the same
reconnection after a broker restart, the same call contract (deadlines, correlation ids, errors as
BusError with a code). What only an agent needs is here: its settings from the environment, joining
(the broker answers), and leaving with a non-zero status when the bus is gone for longer than
`BAAAHT_BUS_LOSS_LIMIT`, so that its container's restart policy or the orchestrator can act.
`baaaht-agent` (agent/main.py) runs the built-in agents.
"""

from baaaht.agent.sdk import Agent, BusLost
from baaaht.agent.settings import AgentSettings, SettingsError

__all__ = ["Agent", "AgentSettings", "BusLost", "SettingsError"]
