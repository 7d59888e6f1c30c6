"""Following an agent container's log in tests: import `agent_log` into the test module."""

from __future__ import annotations

import threading

import pytest

from baaaht.schemas.config import Config
from baaaht.schemas.containers import ContainerLogs
from baaaht.services.containers.docker_runtime import DockerRuntime

WAIT = 60.0  # seconds: a container start and a Python start on a busy machine


class AgentLog:
    """The agent's log lines, followed on the engine itself (the bus may be down meanwhile), read up to
    each line a test waits for; a wait that takes longer than WAIT closes the stream, which ends it."""

    def __init__(self, runtime: DockerRuntime, container: str):
        self.stream = runtime.logs(container, ContainerLogs(id=container, follow=True))
        self.lines = iter(self.stream)
        self.seen: list[str] = []

    def wait_for(self, text: str) -> str:
        give_up = threading.Timer(WAIT, self.stream.close)
        give_up.start()
        try:
            for line in self.lines:
                self.seen.append(line.text)
                if text in line.text:
                    return line.text
        finally:
            give_up.cancel()
        raise AssertionError(f"the agent's log ended without {text!r} within {WAIT}s: {self.seen}")

    def close(self) -> None:
        self.stream.close()


@pytest.fixture
def agent_log():
    runtime = DockerRuntime(Config())
    opened: list[AgentLog] = []

    def follow(container: str) -> AgentLog:
        opened.append(AgentLog(runtime, container))
        return opened[-1]

    yield follow
    for log in opened:
        log.close()
    runtime.close()
