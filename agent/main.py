"""`baaaht-agent`: the built-in agents, run inside an agent container.

    baaaht-agent idle    join the bus and stay until SIGTERM (exit 0)
    baaaht-agent echo    answer each user message of the agent's session with the same text
    baaaht-agent worker  run the session's tool calls on its workspace (agent/worker.py); --slots N
                         (else BAAAHT_WORKER_SLOTS, else 4) at once
    baaaht-agent assistant  answer the session's user messages with an LLM and the session's tools
                         (settings: BAAAHT_ASSISTANT_*, docs/ASSISTANT.md)

Exit status: 0 when stopped by SIGTERM or SIGINT, 2 for bad settings, 3 when the bus was gone for longer
than the bus loss limit (`--bus-loss-limit`, else BAAAHT_BUS_LOSS_LIMIT, else 30 s), 1 for anything else.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable
from functools import partial

from baaaht.agent.assistant.config import AssistantConfig
from baaaht.agent.sdk import Agent, BusLost
from baaaht.agent.settings import AgentSettings, SettingsError
from baaaht.agent.worker import MAX_SLOTS, slots_setting
from baaaht.agent.worker import work as tool_worker
from baaaht.common.logs import setup_logging
from baaaht.common.units import parse_duration
from baaaht.schemas.base import topic_of
from baaaht.schemas.config import LogConfig
from baaaht.schemas.sessions import SessionMessage, SessionSendMessage

EXIT_SETTINGS = 2
EXIT_BUS_LOST = 3


async def idle(agent: Agent) -> None:
    """Stay on the bus; the runner ends it."""
    await asyncio.Event().wait()


async def echo(agent: Agent) -> None:
    """Answer each user message of the agent's session with the same text, as an assistant message.
    The broker delivers an agent only its own session's events; from the start of the kept history
    (`since=0`), so a message sent while the agent was joining is answered too."""
    async for delivery in agent.subscribe([topic_of(SessionMessage)], since=0):
        event = delivery.event
        if isinstance(event, SessionMessage) and event.message.role == "user":
            answer = SessionSendMessage(
                session_id=event.session_id, role="assistant", content=event.message.content
            )
            await agent.call(answer)


async def assistant(agent: Agent, config: AssistantConfig) -> None:
    """The session's assistant (agent/assistant/); imported here only, so the other agents start
    without loading the LLM SDKs."""
    from baaaht.agent.assistant.run import assistant as serve

    await serve(agent, config)


AGENTS: dict[str, Callable[..., Awaitable[None]]] = {
    "idle": idle,
    "echo": echo,
    "worker": tool_worker,
    "assistant": assistant,
}


async def run_agent(work: Callable[[Agent], Awaitable[None]], settings: AgentSettings) -> None:
    """Join, run `work` until SIGTERM/SIGINT (or until it returns), leave. BusLost propagates."""
    agent = Agent(settings)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, agent.stop)
    async with agent:
        working = asyncio.create_task(work(agent), name="baaaht-agent-work")
        stopped = asyncio.create_task(agent.stopped(), name="baaaht-agent-stopped")
        try:
            await asyncio.wait([working, stopped], return_when=asyncio.FIRST_COMPLETED)
        finally:
            working.cancel()
            stopped.cancel()
        if stopped.done() and not stopped.cancelled():
            stopped.result()  # raises BusLost
        if working.done() and not working.cancelled():
            working.result()  # raises what the agent's work raised


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="baaaht-agent", description="Run a built-in baaaht agent.")
    parser.add_argument("agent", choices=sorted(AGENTS), help="which agent to run")
    parser.add_argument(
        "--bus-loss-limit",
        metavar="DURATION",
        help="exit with status 3 after this long without a broker (default: BAAAHT_BUS_LOSS_LIMIT, else 30s)",
    )
    parser.add_argument(
        "--slots",
        type=int,
        metavar="N",
        help=f"worker: tool calls run at once, 1 to {MAX_SLOTS} (default: BAAAHT_WORKER_SLOTS, else 4)",
    )
    parser.add_argument("--log-format", choices=["json", "text"], default="json")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging(LogConfig(format=args.log_format), f"agent-{args.agent}")
    try:
        overrides = {}
        if args.bus_loss_limit is not None:
            try:
                overrides["bus_loss_limit"] = float(parse_duration(args.bus_loss_limit))
            except ValueError as error:
                raise SettingsError(f"--bus-loss-limit {args.bus_loss_limit!r} {error}") from None
        settings = AgentSettings.from_env(**overrides)
        work = AGENTS[args.agent]
        if args.agent == "worker":
            work = partial(work, slots=slots_setting(args.slots))
        elif args.agent == "assistant":
            work = partial(work, config=AssistantConfig.from_env())
        elif args.slots is not None:
            raise SettingsError(f"--slots is the worker's, not the {args.agent} agent's")
    except SettingsError as error:
        print(f"baaaht-agent: {error}", file=sys.stderr)
        sys.exit(EXIT_SETTINGS)
    try:
        asyncio.run(run_agent(work, settings))
    except BusLost as error:
        print(f"baaaht-agent: {error}", file=sys.stderr)
        sys.exit(EXIT_BUS_LOST)
    except SettingsError as error:  # found once joined (an assistant's identity)
        print(f"baaaht-agent: {error}", file=sys.stderr)
        sys.exit(EXIT_SETTINGS)


if __name__ == "__main__":
    main()
