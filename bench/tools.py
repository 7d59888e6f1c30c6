"""Tool-call benchmark, in one run: `read_file` of a small file and `exec(["true"])`, end to end (task.submit
on the `tools` queue through the bus, task.wait until the result is back), served

- warm: by the session's pooled worker, already claimed (the steady state);
- claim: as the first call of a new session, which claims a ready pool container;
- cold: as the first call of a new session with an empty pool, so the container manager starts a hardened
  worker container for it;

against `docker exec` into a running container (`cat` of the same file, `true`), the engine's own fastest
way of running something in a container that already runs.

Targets (issue 13): warm read_file p50 under 20 ms and at least 10x faster than cold; warm exec faster
than docker exec. Prints a table, the load around the run, and writes bench/results/tools.json.
BENCH_SAMPLES (default 200) warm and docker exec samples, BENCH_FIRST_CALLS (default 5) claim and cold
samples of each tool.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import docker
import msgspec
from machine import finish, load_before  # bench/machine.py, beside this script

from baaaht.bus.testing import Host, wait_for
from baaaht.schemas.containers import ContainerPoolResize, ContainerPoolStatus
from baaaht.schemas.sessions import SessionClose, SessionCreate
from baaaht.schemas.tasks import TaskFinished, TaskState, TaskSubmit, TaskWait
from baaaht.schemas.tools import TOOLS_QUEUE, ToolCall, ToolExec, ToolReadFile, tool_name
from baaaht.services.containers.install import FILE_NAME as INSTALL_FILE
from baaaht.services.containers.ownership import LABEL_INSTALL
from baaaht.services.containers.workspaces import LoopMounts, Workspaces

ROOT = Path(__file__).resolve().parent
SAMPLES = int(os.environ.get("BENCH_SAMPLES", "200"))
FIRST_CALLS = int(os.environ.get("BENCH_FIRST_CALLS", "5"))
POOL_SIZE = 2
CALL_TIMEOUT = 120.0  # a cold start on a busy machine
SMALL_FILE = "small.txt"
SMALL_CONTENT = "a small file\n" * 8
AGENT_UID = 1000  # the agent image's user, who owns the workspace
READ = ToolReadFile(path=SMALL_FILE)
TRUE = ToolExec(argv=["true"])


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(len(ordered) * share) - 1)]


def ms(values: list[float]) -> dict:
    return {
        "samples": len(values),
        "p50_ms": statistics.median(values) * 1000,
        "p99_ms": percentile(values, 0.99) * 1000,
    }


class Tools:
    """Tool calls the way the assistant makes them: submit, then wait on the task until it is finished."""

    def __init__(self, host: Host, workspaces: Workspaces):
        self.host = host
        self.workspaces = workspaces
        self.bus = host.client(timeout=CALL_TIMEOUT)

    def new_session(self) -> str:
        """A session whose workspace already holds the small file (put there on the host, as the operator's
        `sessions cp` does, before the session's first call)."""
        session = self.bus.call(SessionCreate(owner="bench")).id
        workspace = Path(self.workspaces.ensure(session))
        (workspace / SMALL_FILE).write_text(SMALL_CONTENT)
        os.chown(workspace / SMALL_FILE, AGENT_UID, AGENT_UID)
        return session

    def call(self, session: str, call: ToolCall) -> float:
        """Seconds from the submit to the result; raises when the call did not succeed."""
        request = TaskSubmit(
            queue=TOOLS_QUEUE,
            task_type=tool_name(type(call)),
            payload=msgspec.msgpack.encode(call),
            session_id=session,
        )
        started = time.perf_counter()
        task = self.bus.call(request).task
        for item in self.bus.stream(TaskWait(id=task.id), timeout=CALL_TIMEOUT):
            if isinstance(item, TaskFinished):
                elapsed = time.perf_counter() - started
                if item.state is not TaskState.SUCCEEDED:
                    last = item.attempts[-1] if item.attempts else None
                    why = f"{last.error_type}: {last.error} (worker {last.worker})" if last else "no attempt"
                    raise RuntimeError(f"{task.task_type} ended {item.state.value}: {why}")
                return elapsed
        raise RuntimeError(f"task.wait of {task.id} ended without the task")

    def pool(self):
        return self.bus.call(ContainerPoolStatus())

    def resize(self, size: int) -> None:
        self.bus.call(ContainerPoolResize(size=size))
        wait_for(
            lambda: sum(1 for slot in self.pool().slots if slot.state in ("ready", "starting")) == size,
            CALL_TIMEOUT,
            interval=0.1,
            what=f"a pool of {size}",
        )

    def wait_for_pool(self) -> None:
        wait_for(
            lambda: (
                (status := self.pool()) and sum(1 for s in status.slots if s.state == "ready") >= status.size
            ),
            CALL_TIMEOUT,
            interval=0.1,
            what="a full pool",
        )

    def worker_of(self, session: str) -> str:
        [claimed] = [slot.container_id for slot in self.pool().slots if slot.session_id == session]
        return claimed


def first_calls(tools: Tools, call: ToolCall, *, pooled: bool) -> list[float]:
    """The first call of FIRST_CALLS new sessions: each claims a ready container from a full pool, or
    (with an empty pool) has one started cold."""
    times = []
    for _ in range(FIRST_CALLS):
        if pooled:
            tools.wait_for_pool()
        session = tools.new_session()
        times.append(tools.call(session, call))
        tools.bus.call(SessionClose(session_id=session))  # its worker goes: the host stays as quiet
    return times


def docker_execs(client: docker.DockerClient, container: str, argv: list[str]) -> list[float]:
    api, times = client.api, []
    for _ in range(SAMPLES + 1):
        started = time.perf_counter()
        made = api.exec_create(container, argv, user="1000")
        api.exec_start(made["Id"])
        if api.exec_inspect(made["Id"])["ExitCode"] != 0:
            raise RuntimeError(f"docker exec {argv} failed")
        times.append(time.perf_counter() - started)
    return times[1:]  # the first opens the connection


def run(tools: Tools, client: docker.DockerClient) -> dict:
    tools.wait_for_pool()
    steady = tools.new_session()
    tools.call(steady, READ)  # claims the session's worker
    tools.wait_for_pool()  # refilled
    warm_read = [tools.call(steady, READ) for _ in range(SAMPLES)]
    warm_exec = [tools.call(steady, TRUE) for _ in range(SAMPLES)]
    worker = tools.worker_of(steady)
    exec_read = docker_execs(client, worker, ["cat", f"/workspace/{SMALL_FILE}"])
    exec_true = docker_execs(client, worker, ["true"])
    claim_read = first_calls(tools, READ, pooled=True)
    claim_exec = first_calls(tools, TRUE, pooled=True)
    tools.resize(0)
    cold_read = first_calls(tools, READ, pooled=False)
    cold_exec = first_calls(tools, TRUE, pooled=False)
    found = {
        "read_file": {
            "warm": ms(warm_read),
            "claim": ms(claim_read),
            "cold": ms(cold_read),
            "docker_exec": ms(exec_read),
        },
        "exec_true": {
            "warm": ms(warm_exec),
            "claim": ms(claim_exec),
            "cold": ms(cold_exec),
            "docker_exec": ms(exec_true),
        },
    }
    read, true = found["read_file"], found["exec_true"]
    found["targets"] = {
        "warm_read_p50_under_20ms": read["warm"]["p50_ms"] < 20,
        "warm_read_10x_faster_than_cold": read["cold"]["p50_ms"] >= 10 * read["warm"]["p50_ms"],
        "warm_exec_faster_than_docker_exec": true["warm"]["p50_ms"] < true["docker_exec"]["p50_ms"],
    }
    return found


def report(result: dict) -> None:
    print(f"{'tool':<10} {'path':<12} {'samples':>7} {'p50 ms':>9} {'p99 ms':>9}")
    for tool in ("read_file", "exec_true"):
        for path, figures in result[tool].items():
            p50, p99 = figures["p50_ms"], figures["p99_ms"]
            print(f"{tool:<10} {path:<12} {figures['samples']:>7} {p50:>9.2f} {p99:>9.2f}")
    for target, met in result["targets"].items():
        print(f"{target}: {'met' if met else 'MISSED'}")


def main() -> None:
    machine = load_before()
    # Built when missing or stale, by the same command as `make images`.
    built = subprocess.run(
        [sys.executable, "-m", "baaaht.host.images", "agent"], capture_output=True, text=True, timeout=1800
    )
    if built.returncode != 0:
        sys.exit(f"cannot build the agent image: {built.stderr.strip()}")
    image = built.stdout.strip()
    client = docker.from_env(timeout=120)
    with tempfile.TemporaryDirectory(prefix="baaaht-bench-") as tmp:
        host = Host(
            Path(tmp),
            {
                "log": {"level": "warn"},
                "policy": {"max_containers": 8},
                "container": {"agent_image": image, "orphan_grace": "0s", "reconcile_interval": "1h"},
                "pool": {"size": POOL_SIZE, "max": POOL_SIZE},
                "session": {"max_sessions": 10 + 4 * FIRST_CALLS, "close_timeout": "30s"},
            },
        )
        host.start_broker()
        install_label = ""
        try:
            host.start_service("baaaht.services.policy", service="policy")
            host.start_service("baaaht.services.sessions", service="session")
            host.start_service("baaaht.services.scheduler", "scheduler", service="task")
            host.start_service("baaaht.services.containers", service="container")
            install_label = f"{LABEL_INSTALL}={(host.data_dir / INSTALL_FILE).read_text().strip()}"
            config = host.config
            workspaces = Workspaces(config.data_dir, config.workspace.size, LoopMounts())
            result = run(Tools(host, workspaces), client)
        finally:
            if install_label:
                for leftover in client.containers.list(
                    all=True, sparse=True, filters={"label": install_label}
                ):
                    leftover.remove(force=True)
            host.stop()  # unmounts what the pool and the workspaces mounted
    result["machine"] = finish(machine)
    report(result)
    out = ROOT / "results" / "tools.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
