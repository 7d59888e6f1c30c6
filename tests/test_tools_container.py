"""The tools inside a real hardened agent container, on a bind-mounted workspace: exec sees no network
but lo (and no DNS), a write lands in the workspace, a symlink to /etc is refused."""

from __future__ import annotations

import json
import os

import pytest

from tests import container_support

docker_client, test_label = container_support.docker_client, container_support.test_label

pytestmark = pytest.mark.docker

# What exec runs to see the network: the interfaces on one line, then whether a name resolves.
NETWORK = """
import socket
print(" ".join(sorted(name for _, name in socket.if_nameindex())))
try:
    socket.getaddrinfo("example.com", 80)
    print("dns")
except OSError:
    print("no-dns")
"""
SCRIPT = (
    f"NETWORK = {NETWORK!r}\n"
    + r"""
import asyncio, json, os
from baaaht.agent.tools import ToolError, Tools, Workspace
from baaaht.schemas.tools import ToolExec, ToolReadFile, ToolWriteFile

workspace = Workspace("/workspace")
tools = Tools(workspace, "/run/baaaht/agent/egress.sock")
chunks = []
result = asyncio.run(tools.run(ToolExec(argv=["python3", "-c", NETWORK]), chunks.append))
found = {"openat2": workspace.uses_openat2, "exit": result.exit_code}
found["interfaces"], found["dns"] = "".join(chunk.data for chunk in chunks).splitlines()
asyncio.run(tools.run(ToolWriteFile(path="made/here.txt", content="hi", create_dirs=True), chunks.append))
os.symlink("/etc", "/workspace/etc")
try:
    asyncio.run(tools.run(ToolReadFile(path="etc/passwd"), chunks.append))
    found["escape"] = "read"
except ToolError as error:
    found["escape"] = error.code.value
print(json.dumps(found))
"""
)


def test_the_tools_in_a_hardened_agent_container(docker_client, agent_image, test_label, tmp_path):
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    os.chmod(workspace, 0o777)  # the agent runs as uid 1000
    output = docker_client.containers.run(
        agent_image,
        ["python3", "-c", SCRIPT],
        labels=test_label,
        remove=True,
        read_only=True,
        network_mode="none",
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        pids_limit=64,
        tmpfs={"/tmp": ""},
        volumes={str(workspace): {"bind": "/workspace", "mode": "rw"}},
        init=True,
    )
    found = json.loads(output.decode().strip().splitlines()[-1])
    assert found["exit"] == 0 and found["interfaces"] == "lo" and found["dns"] == "no-dns"
    assert found["escape"] in ("PERMISSION_DENIED", "FAILED_PRECONDITION")
    assert (workspace / "made" / "here.txt").read_text() == "hi"
