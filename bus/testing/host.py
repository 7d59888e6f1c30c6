"""A real host for tests: a broker process and service processes on a private run directory.

    host = Host(tmp_path, {"session": {"max_sessions": 4}})
    host.start_broker()
    host.start_service("baaaht.services.sessions", "session")   # waits for bus.service.up, then ready
    client = host.client()
    ...
    host.stop()                                                   # every process and client it made

The `host` and `make_host` pytest fixtures (baaaht.bus.testing.fixtures) do the starting and stopping.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from baaaht.bus.client import BusClient
from baaaht.bus.runner import STARTING
from baaaht.bus.testing.waits import next_event, wait_for
from baaaht.common.config import load_config
from baaaht.schemas.base import topic_of
from baaaht.schemas.bus import BusPing, BusServices, ServiceUp

# Short heartbeats so that a killed process is noticed within a test's patience.
TEST_BUS = {"heartbeat_interval": "200ms", "heartbeat_liveness": 3, "call_timeout": "5s"}
REGISTER_TIMEOUT = 15.0


def deep_merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = deep_merge(merged[key], value) if isinstance(merged.get(key), dict) else value
    return merged


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
                # Outside data_dir, as the configuration requires, and inside the test's directory.
                "credentials": {"master_key_file": str(tmp_path / "keys" / "credentials.key")},
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
        # Nothing is published before the broker answers: poll it.
        wait_for(lambda: probe.call(BusPing()), what="the broker to answer bus.ping")

    def start_service(
        self, target: str, name: str | None = None, *, service: str | None = None, wait: bool = True
    ) -> subprocess.Popen:
        """Start `python -m MODULE` (or a script path) and wait until it is registered and started."""
        name = name or target
        argv = [target] if target.endswith(".py") else ["-m", target]
        process = self.spawn(name, argv)
        if wait:
            self.wait_registered(service or name, process.pid)
        return process

    def wait_service_up(
        self, service: str, instance: str = "", timeout: float = REGISTER_TIMEOUT, what: str = ""
    ) -> ServiceUp:
        """Until an instance of `service` (whose id ends with `instance`, when given) has registered:
        its bus.service.up, replayed from the broker's history when it came first."""
        probe = self.client(timeout=0.5)

        def this_instance(delivery) -> bool:
            up = delivery.event
            return isinstance(up, ServiceUp) and up.service == service and up.instance.endswith(instance)

        with probe.subscribe([topic_of(ServiceUp)], since=0) as ups:
            return next_event(ups, this_instance, timeout, what or f"service {service} to register").event

    def wait_registered(self, service: str, pid: int, timeout: float = REGISTER_TIMEOUT) -> None:
        """Until the instance of process `pid` has registered and reported itself started (no event
        says that: a short bounded poll after its bus.service.up)."""
        # The runner's instance id is HOST-PID.
        self.wait_service_up(service, f"-{pid}", timeout, f"service {service} (pid {pid}) to register")
        probe = self.client(timeout=0.5)

        def started() -> bool:
            services = probe.call(BusServices(service=service)).services
            return any(i.pid == pid and i.reason != STARTING for s in services for i in s.instances)

        wait_for(started, timeout, what=f"service {service} (pid {pid}) to report itself started")

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
