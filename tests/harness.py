"""A real host for tests: a broker process and service processes on a private run directory."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from baaaht.bus.client import BusClient
from baaaht.bus.errors import BusError
from baaaht.bus.runner import STARTING
from baaaht.common.config import load_config
from baaaht.schemas.bus import Ping, ServicesQuery

TEST_BUS = {"heartbeat_interval": "200ms", "heartbeat_liveness": 3, "call_timeout": "5s"}


# Runs argv[2:] with SIGINT set to argv[1] (SIG_DFL or SIG_IGN): exec keeps a default or ignored disposition,
# so the program starts with it whatever this test process inherited (a suite run as a background job
# inherits SIGINT ignored).
_WITH_SIGINT = (
    "import os, signal, sys; signal.signal(signal.SIGINT, getattr(signal, sys.argv[1]));"
    " os.execvp(sys.argv[2], sys.argv[2:])"
)


def with_sigint(disposition: str, argv: list[str]) -> list[str]:
    """argv started with SIGINT "SIG_DFL" (as a foreground command in a terminal) or "SIG_IGN"."""
    return [sys.executable, "-c", _WITH_SIGINT, disposition, *argv]


def deep_merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = deep_merge(merged[key], value) if isinstance(merged.get(key), dict) else value
    return merged


def wait_for(
    check: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05, what: str = "condition"
):
    """Poll `check` until it returns something truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except (BusError, AssertionError) as exc:
            last_error = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last_error})")


class Host:
    def __init__(self, tmp_path: Path, overrides: dict | None = None):
        self.tmp_path = tmp_path
        tmp_path.mkdir(parents=True, exist_ok=True)
        # ipc:// paths are limited to ~107 bytes: pytest's tmp_path is too long for the run directory.
        self.run_dir = tempfile.mkdtemp(prefix="bh-", dir="/tmp")
        self.data_dir = tmp_path / "data"
        raw = deep_merge(
            {
                "data_dir": str(self.data_dir),
                "bus": {"run_dir": self.run_dir, **TEST_BUS},
                "log": {"level": "debug", "format": "json"},
            },
            overrides or {},
        )
        self.config_path = tmp_path / "config.json"
        self.config_path.write_text(json.dumps(raw))
        self.config, _ = load_config(str(self.config_path), env={})
        self.processes: dict[str, subprocess.Popen] = {}
        self.clients: list[BusClient] = []

    # -- processes ----------------------------------------------------------------------------

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.tmp_path / f"{name}.log", "ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_")}
        process = subprocess.Popen(
            [sys.executable, *argv, "--config", str(self.config_path)], stdout=log, stderr=log, env=env
        )
        log.close()
        self.processes[name] = process
        return process

    def start_broker(self) -> None:
        self.spawn("broker", ["-m", "baaaht.bus.broker"])
        probe = self.client(timeout=0.5)
        wait_for(lambda: probe.call(Ping()), what="the broker to answer bus.ping")

    def start_service(
        self, target: str, name: str | None = None, *, service: str | None = None, wait: bool = True
    ):
        """Start `python -m MODULE` (or a script path) and wait until it is registered and started."""
        name = name or target
        argv = [target] if target.endswith(".py") else ["-m", target]
        process = self.spawn(name, argv)
        if wait:
            self.wait_registered(service or name, process.pid)
        return process

    def wait_registered(self, service: str, pid: int) -> None:
        probe = self.client(timeout=0.5)

        def registered():
            services = probe.call(ServicesQuery(service=service)).services
            return any(i.pid == pid and i.reason != STARTING for s in services for i in s.instances)

        wait_for(registered, what=f"service {service} (pid {pid}) to register and start", timeout=15)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        process = self.processes.pop(name)
        process.send_signal(sig)
        process.wait(10)

    def log(self, name: str) -> str:
        return (self.tmp_path / f"{name}.log").read_text(errors="replace")

    def client(self, timeout: float = 5.0) -> BusClient:
        client = BusClient.for_config(self.config, timeout=timeout)
        self.clients.append(client)
        return client

    def stop(self) -> None:
        for client in self.clients:
            client.close()
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        self.processes.clear()
        shutil.rmtree(self.run_dir, ignore_errors=True)
