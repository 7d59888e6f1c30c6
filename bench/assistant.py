"""Assistant benchmark: how long baaaht itself takes around a model that answers at once.

A whole host on a private run directory (broker, policy, session, credential with the egress proxy,
scheduler, container manager on the real engine), the fake LLM (baaaht.bus.testing.fake_llm, TLS on
loopback, no delay between chunks) as the only upstream, reached through the egress proxy; the session's
assistant and worker are real containers of the agent image, started once (warm-up rounds) and reused.
Per round, from the operator's `session.send_message`:

- first token: until the first `session.partial` text event reaches the operator; with a model that
  answers at once this is all baaaht's overhead, split at the model request's arrival upstream into
  "to the model" (send, session.message event, the assistant reading the conversation, the proxy's way
  out) and "back" (the proxy's way back, the SDK, the partial event published and delivered);
- stored answer: until the message ending the turn is delivered as `session.message`;
- with one tool call (read_file through the warm worker): the stored answer, and the tool task's time
  from its submit to its recorded result (scheduler, worker and tool) and the part its lease ran (the
  worker and the tool), from the scheduler's own record (wall clock).

Also the bus's own round trip (bus.ping) for scale. Target (issue 14): baaaht's overhead before the first
token under 10 ms p50. Prints the figures and writes bench/results/assistant.json. Needs the engine
(make docker) and the agent image (built when missing, as `make images` does).

    python bench/assistant.py   # BENCH_ROUNDS (default 20), BENCH_TOOL_ROUNDS (default 10)
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import docker
from machine import load_before, save  # bench/machine.py, beside this script

from baaaht.bus.testing import next_event
from baaaht.bus.testing.fake_llm import FakeLLM, call_tool, say, say_tool_result
from baaaht.bus.testing.host import HOST_SERVICES, Host
from baaaht.schemas.base import session_topic
from baaaht.schemas.bus import BusPing
from baaaht.schemas.credentials import CredentialPut
from baaaht.schemas.sessions import (
    SessionClose,
    SessionCreate,
    SessionDelete,
    SessionMessage,
    SessionPartial,
    SessionSendMessage,
)
from baaaht.schemas.tasks import TaskList
from baaaht.services.containers.install import FILE_NAME as INSTALL_FILE
from baaaht.services.containers.ownership import LABEL_INSTALL
from baaaht.services.containers.workspaces import LoopMounts, Workspaces

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "20"))
TOOL_ROUNDS = int(os.environ.get("BENCH_TOOL_ROUNDS", "10"))
WARM_UP = 2  # rounds not counted: the first starts the assistant (and the worker) container
TIMEOUT = 240.0  # seconds for one answer (a cold container start on a busy machine)
PINGS = 200


def agent_image() -> str:
    built = subprocess.run(
        [sys.executable, "-m", "baaaht.host.images", "agent"], capture_output=True, text=True, timeout=900
    )
    if built.returncode != 0:
        sys.exit(f"cannot build the agent image: {built.stderr.strip()}")
    return built.stdout.strip()


def ms(seconds: list[float]) -> dict:
    ordered = sorted(seconds)
    return {
        "p50_ms": round(statistics.median(ordered) * 1000, 2),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 2),
        "n": len(ordered),
    }


class Bench:
    def __init__(self, directory: Path, llm: FakeLLM, image: str):
        route = {
            "name": "anthropic",
            "upstream": llm.url,
            "credential": "anthropic",
            "inject": "x-api-key",
            "paths": ["/v1/messages"],
            "roles": ["assistant"],
            "usage": "anthropic",
        }
        self.llm = llm
        self.host = Host(
            directory,
            {
                "log": {"level": "info"},
                "container": {"agent_image": image, "reconcile_interval": "1h"},
                "egress": {"routes": [route], "ca_file": llm.ca_file},
                "pool": {"size": 0},
            },
        )
        self.host.start_broker()
        for module, name in HOST_SERVICES:
            self.host.start_service(module, name)
        self.install_id = (self.host.data_dir / INSTALL_FILE).read_text().strip()
        self.bus = self.host.client(timeout=30)
        self.bus.call(CredentialPut(name="anthropic", kind="api_key", value=b"sk-bench-not-a-real-key"))
        self.session_id = self.bus.call(SessionCreate(owner="bench", name="bench")).id
        config = self.host.config
        workspace = Workspaces(config.data_dir, config.workspace.size, LoopMounts()).ensure(self.session_id)
        Path(workspace, "notes.txt").write_text("the first line\n")
        os.chown(Path(workspace, "notes.txt"), 1000, 1000)

    def round(self, text: str) -> dict:
        """One question: the times from its send to the first partial and to the stored answer."""
        topics = [
            session_topic(SessionPartial, self.session_id),
            session_topic(SessionMessage, self.session_id),
        ]
        with self.bus.subscribe(topics) as events:
            started = time.monotonic()
            asked = self.bus.call(SessionSendMessage(session_id=self.session_id, content=text))
            next_event(
                events,
                lambda d: isinstance(d.event, SessionPartial) and d.event.kind == "text",
                TIMEOUT,
                "a token",
            )
            first_at = time.monotonic()

            def ended(delivery) -> bool:
                event = delivery.event
                return isinstance(event, SessionMessage) and bool(
                    event.message.metadata.reply_to == asked.id and event.message.metadata.turn_end
                )

            next_event(events, ended, TIMEOUT, "the stored answer")
            answered_at = time.monotonic()
        upstream_at = min(r.at for r in self.llm.requests if r.at >= started)
        return {
            "first_token": first_at - started,
            "to_model": upstream_at - started,
            "back": first_at - upstream_at,
            "answer": answered_at - started,
        }

    def tool_round(self) -> dict:
        self.llm.script.extend(
            [[call_tool("read_file", path="notes.txt")], [say("It says: "), say_tool_result("content")]]
        )
        times = self.round("What does notes.txt say?")
        tasks = self.bus.call(TaskList(session_id=self.session_id, limit=1000)).tasks
        task = max(tasks, key=lambda t: t.created_at)
        attempt = task.attempts[-1]
        times["tool_task"] = attempt.ended_at - task.created_at  # submitted to its result recorded
        times["tool_running"] = attempt.ended_at - attempt.leased_at  # a lease is the task's start
        return times

    def close(self) -> None:
        try:
            self.bus.call(SessionClose(session_id=self.session_id), timeout=60)
            self.bus.call(SessionDelete(session_id=self.session_id))
        finally:
            engine = docker.from_env()
            for container in engine.containers.list(
                all=True, filters={"label": f"{LABEL_INSTALL}={self.install_id}"}
            ):
                container.remove(force=True, v=True)
            engine.close()
            self.host.stop()


def main() -> None:
    machine = load_before()
    image = agent_image()
    directory = Path(tempfile.mkdtemp(prefix="bench-assistant-"))
    try:
        with FakeLLM(directory / "llm") as llm:
            bench = Bench(directory / "host", llm, image)
            try:
                pings = []
                for _ in range(PINGS):
                    started = time.perf_counter()
                    bench.bus.call(BusPing())
                    pings.append(time.perf_counter() - started)
                plain = [bench.round(f"question {n}") for n in range(WARM_UP + ROUNDS)][WARM_UP:]
                tools = [bench.tool_round() for _ in range(WARM_UP + TOOL_ROUNDS)][WARM_UP:]
            finally:
                bench.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    figures = {
        "bus_ping": ms(pings),
        "first_token": ms([r["first_token"] for r in plain]),
        "first_token_to_model": ms([r["to_model"] for r in plain]),
        "first_token_back": ms([r["back"] for r in plain]),
        "stored_answer": ms([r["answer"] for r in plain]),
        "tool_stored_answer": ms([r["answer"] for r in tools]),
        "tool_task": ms([r["tool_task"] for r in tools]),
        "tool_running": ms([r["tool_running"] for r in tools]),
        "target_first_token_p50_ms": 10.0,
    }
    for name, value in figures.items():
        print(f"{name:24} {value}")
    verdict = "meets" if figures["first_token"]["p50_ms"] < 10.0 else "misses"
    print(f"baaaht's overhead before the first token {verdict} the 10 ms p50 target")
    save("assistant", machine, figures)


if __name__ == "__main__":
    main()
