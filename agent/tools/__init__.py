"""The tools a worker runs in its container, on the session's workspace (schemas/tools.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from baaaht.agent.tools import files
from baaaht.agent.tools.errors import ToolError
from baaaht.agent.tools.exec import run_exec
from baaaht.agent.tools.fetch import fetch
from baaaht.agent.tools.workspace import Workspace
from baaaht.schemas.tools import ToolCall, ToolExec, ToolExecChunk, ToolFetch, ToolOutput

__all__ = ["ToolError", "Tools", "Workspace"]

_FILE_TOOLS = {
    "read_file": files.read_file,
    "write_file": files.write_file,
    "edit_file": files.edit_file,
    "list_dir": files.list_dir,
    "glob": files.glob,
    "grep": files.grep,
}


class Tools:
    """Runs one tool call; a failure is a ToolError (code, message, details)."""

    def __init__(self, workspace: Workspace, egress_socket: str) -> None:
        self.workspace = workspace
        self.egress_socket = egress_socket

    async def run(self, call: ToolCall, emit: Callable[[ToolExecChunk], None]) -> ToolOutput:
        if isinstance(call, ToolExec):
            return await run_exec(self.workspace, call, emit)
        if isinstance(call, ToolFetch):
            return await asyncio.to_thread(fetch, self.egress_socket, call)
        return await asyncio.to_thread(_FILE_TOOLS[call.__struct_config__.tag], self.workspace, call)
