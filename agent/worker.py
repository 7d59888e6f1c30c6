"""`baaaht-agent worker`: a session's tool worker. It takes tool calls from the scheduler's `tools` queue
(the scheduler gives a worker only its own session's tasks) and runs them with the tool library on the
session's workspace, mounted at /workspace.

A task's payload is a ToolCall (schemas/tools.py), its result the tool's ToolOutput; exec output goes
out as it comes (`WorkerTask.progress`, one msgpack'd ToolExecChunk each). A ToolError fails the task
without a retry, its error type the error code (NOT_FOUND, PERMISSION_DENIED, ...). A worker whose
container has no identity yet (a warm-pool container before its claim) is refused `task.work`: it asks
again every second, and at once on SIGURG (what a claim sends: ignored by default, so one that comes
while Python is still starting does no harm).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Mapping

import msgspec

from baaaht.agent.sdk import Agent
from baaaht.agent.settings import SettingsError
from baaaht.agent.tools import ToolError, Tools, Workspace
from baaaht.bus.errors import BusError
from baaaht.bus.worker import Handler, NonRetryableError, Worker, WorkerTask
from baaaht.schemas.errors import ErrorCode
from baaaht.schemas.tools import TOOLS, TOOLS_QUEUE, AnyToolCall, ToolOutput, tool_name

log = logging.getLogger("baaaht.agent.worker")

WORKSPACE = "/workspace"
SLOTS = "BAAAHT_WORKER_SLOTS"
DEFAULT_SLOTS = 4
MAX_SLOTS = 64
EGRESS_SOCKET_NAME = "egress.sock"  # beside the bus socket, in the agents' directory (docs/EGRESS.md)
UNIDENTIFIED_RETRY = 1.0  # seconds between task.work attempts while this container has no identity

_encode = msgspec.msgpack.Encoder().encode


def slots_setting(flag: int | None = None, environ: Mapping[str, str] = os.environ) -> int:
    """How many tool calls run at once: the flag, else BAAAHT_WORKER_SLOTS, else DEFAULT_SLOTS."""
    name, text = (
        ("--slots", str(flag)) if flag is not None else (SLOTS, environ.get(SLOTS, str(DEFAULT_SLOTS)))
    )
    try:
        slots = int(text)
    except ValueError:
        slots = 0
    if not 1 <= slots <= MAX_SLOTS:
        raise SettingsError(f"{name}={text!r}: expected a whole number of task slots from 1 to {MAX_SLOTS}")
    return slots


def egress_socket_of(bus: str) -> str:
    """The egress proxy's socket: in the directory of the agent socket (ipc://<dir>/bus.sock)."""
    if not bus.startswith("ipc://"):
        raise SettingsError(f"the worker reaches the egress proxy beside an ipc:// bus socket, not {bus!r}")
    return os.path.join(os.path.dirname(bus.removeprefix("ipc://")), EGRESS_SOCKET_NAME)


class SessionTools:
    """The tools on the workspace, opened at the first call: in a warm-pool container /workspace becomes
    the session's (a mount on top of the empty slot directory) only when a session claims it, and a
    workspace opened before would hold the slot directory underneath."""

    def __init__(self, root: str, egress_socket: str):
        self.root = root
        self.egress_socket = egress_socket
        self.workspace: Workspace | None = None
        self.tools: Tools | None = None

    def get(self) -> Tools:
        if self.tools is None:
            self.workspace = Workspace(self.root)
            self.tools = Tools(self.workspace, self.egress_socket)
        return self.tools

    def close(self) -> None:
        if self.workspace is not None:
            self.workspace.close()


def tool_handler(tools: SessionTools) -> Handler:
    """The handler of every tool's tasks: decode the call, run it, stream exec output as progress."""

    async def handle(task: WorkerTask) -> ToolOutput:
        try:
            call = msgspec.convert(task.payload, AnyToolCall)
        except msgspec.ValidationError as error:
            raise NonRetryableError(f"not a tool call: {error}", ErrorCode.INVALID_ARGUMENT.value) from None
        if tool_name(type(call)) != task.type:
            raise NonRetryableError(
                f"the task's type {task.type!r} is not its call's tool {tool_name(type(call))!r}",
                ErrorCode.INVALID_ARGUMENT.value,
            )
        try:
            return await tools.get().run(call, lambda chunk: task.progress(_encode(chunk)))
        except ToolError as error:
            raise NonRetryableError(error.message, error.code.value) from None

    return handle


async def serve(worker: Worker, retry_now: asyncio.Event) -> None:
    """Run the worker; while task.work is refused PERMISSION_DENIED (no identity yet), ask again every
    UNIDENTIFIED_RETRY seconds, or as soon as `retry_now` is set."""
    told = False
    while True:
        try:
            await worker.run()
        except BusError as error:
            if error.code is not ErrorCode.PERMISSION_DENIED:
                raise
            if not told:
                log.info("not identified yet: waiting for an identity", extra={"reason": error.message})
                told = True
            try:
                await asyncio.wait_for(retry_now.wait(), UNIDENTIFIED_RETRY)
            except TimeoutError:
                pass
            retry_now.clear()


async def work(agent: Agent, slots: int, workspace_root: str = WORKSPACE) -> None:
    tools = SessionTools(workspace_root, egress_socket_of(agent.settings.bus))
    handle = tool_handler(tools)
    worker = Worker(agent.bus, [TOOLS_QUEUE], slots, {tool_name(call): handle for call in TOOLS})
    retry_now = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGURG, retry_now.set)
    log.info("worker started", extra={"slots": slots, "workspace": workspace_root})
    try:
        await serve(worker, retry_now)
    finally:
        loop.remove_signal_handler(signal.SIGURG)
        tools.close()
