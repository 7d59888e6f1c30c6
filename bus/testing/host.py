"""A real host for tests: a broker process and service processes on a private run directory.

    host = Host(tmp_path, {"session": {"max_sessions": 4}})
    host.start_broker()
    host.start_service("baaaht.services.sessions", "session")   # waits for bus.service.up, then ready
    client = host.client()
    ...
    host.stop()                                                   # every process and client it made

Agents without containers: `host.identify(pid, session)` makes process `pid` (the test's own, by
default) a process of a container with that identity, as the container manager would (the kit's
broker also reads a fake /proc: baaaht.bus.testing.broker); `host.agent_client()` connects on the
agent socket; `host.service_client()` is a registered service (say, to call `bus.agents.update`).

The `host` and `make_host` pytest fixtures (baaaht.bus.testing.fixtures) do the starting and stopping.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from baaaht.bus import wire
from baaaht.bus.client import BusClient
from baaaht.bus.connection import Connection
from baaaht.bus.runner import STARTING
from baaaht.bus.testing.waits import next_event, wait_for
from baaaht.common.config import load_config
from baaaht.common.endpoints import Endpoints
from baaaht.common.identity import AgentIdentity, IdentityStore
from baaaht.common.mounts import unmount_beneath
from baaaht.schemas.base import topic_of
from baaaht.schemas.bus import (
    BusAgentsUpdate,
    BusAgentsUpdateResult,
    BusPing,
    BusServices,
    Register,
    ServiceUp,
)

# Short heartbeats, so that a hung peer is noticed within a test's patience (a killed one is noticed at
# once, by its connection's close), and a liveness that a loaded machine's stalls do not exhaust: a peer
# counts as gone after 5 s of silence, not 0.6 s (suites under load 10 on 2 cores saw "lost the broker").
TEST_BUS = {"heartbeat_interval": "200ms", "heartbeat_liveness": 25, "call_timeout": "5s"}
REGISTER_TIMEOUT = 15.0
# Every service of a whole host, as (module, name), in an order where each finds the peers it asks at start.
HOST_SERVICES = (
    ("baaaht.services.policy", "policy"),
    ("baaaht.services.sessions", "session"),
    ("baaaht.services.credentials", "credential"),
    ("baaaht.services.scheduler", "task"),
    ("baaaht.services.containers", "container"),
)


def short_run_dir(prefix: str = "bh-") -> str:
    """A new private directory in /tmp for a run's ipc sockets (ipc:// paths are limited to ~107 bytes:
    pytest's tmp_path is too long), named `<prefix><pid>-…` by the process that made it, so that a check
    for mounts left behind (tests/leftover_mounts.py) tells its own from those of other runs."""
    return tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir="/tmp")


def deep_merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = deep_merge(merged[key], value) if isinstance(merged.get(key), dict) else value
    return merged


class Host:
    def __init__(self, tmp_path: Path, overrides: dict | None = None):
        self.tmp_path = tmp_path
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.run_dir = short_run_dir()
        self.data_dir = tmp_path / "data"
        raw = deep_merge(
            {
                "data_dir": str(self.data_dir),
                "bus": {"run_dir": self.run_dir, **TEST_BUS},
                "log": {"level": "debug", "format": "json"},
                # No warm pool unless a test asks for one: its containers would start on every host.
                "pool": {"size": 0},
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
        self.endpoints = Endpoints.for_config(self.config.bus)
        self.identities = IdentityStore(self.run_dir)
        self.fake_proc = tmp_path / "proc"  # read by the kit's broker before the real /proc
        self._manager: BusClient | None = None  # the service client that calls bus.agents.update

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
        self.spawn("broker", ["-m", "baaaht.bus.testing.broker", "--proc", str(self.fake_proc)])
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

    # -- agents without containers ------------------------------------------------------------

    def identify(
        self, session: str, role: str = "agent", pid: int | None = None, container: str = ""
    ) -> AgentIdentity:
        """Make process `pid` (this one by default) a process of `container` (a new id by default) and
        issue that container the identity, as the container manager does. Connections made from then
        on are that agent; one made before keeps what it was (`update` re-reads)."""
        container = container or secrets.token_hex(32)
        cgroup = self.fake_proc / str(os.getpid() if pid is None else pid) / "cgroup"
        cgroup.parent.mkdir(parents=True, exist_ok=True)
        cgroup.write_text(f"0::/system.slice/docker-{container}.scope\n")
        identity = AgentIdentity(
            container_id=container, session_id=session, role=role, install_id="test", issued_at=time.time()
        )
        self.identities.put(identity)
        return identity

    def forget_pid(self, pid: int | None = None) -> None:
        """Process `pid` is in no container any more (for connections made from now on)."""
        (self.fake_proc / str(os.getpid() if pid is None else pid) / "cgroup").unlink(missing_ok=True)

    def agent_client(self, timeout: float = 5.0) -> BusClient:
        """A client on the agent socket (no event socket: it subscribes on its connection)."""
        bus = self.config.bus
        client = BusClient(
            self.endpoints.agents,
            timeout=timeout,
            heartbeat_interval=float(bus.heartbeat_interval),
            liveness=bus.heartbeat_liveness,
        )
        self.clients.append(client)
        return client

    def service_client(self, service: str = "kit", timeout: float = 5.0) -> BusClient:
        """A client registered as service `service` (with no methods): it has the service role."""
        registration = Register(service=service, instance=f"{service}-{secrets.token_hex(4)}", methods=[])
        connection = Connection(
            self.endpoints.services,
            heartbeat_interval=float(self.config.bus.heartbeat_interval),
            liveness=self.config.bus.heartbeat_liveness,
            registration=lambda: wire.encode(registration),
        )
        client = BusClient(
            self.endpoints.services,
            events_endpoint=self.endpoints.events,
            timeout=timeout,
            connection=connection,
        )
        self.clients.append(client)
        client.call(BusPing())  # after the REGISTER on the same connection: the broker has it
        return client

    def update(self, container: str) -> BusAgentsUpdateResult:
        """`bus.agents.update`, as the container manager calls it after writing or removing an identity."""
        if self._manager is None:
            self._manager = self.service_client("kit-container-manager")
        return self._manager.call(BusAgentsUpdate(container_id=container))

    def revoke(self, container: str) -> BusAgentsUpdateResult:
        """Remove the container's identity and tell the broker, as when the container is removed."""
        self.identities.remove(container)
        return self.update(container)

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
        # The container manager's mounts (workspaces, the warm pool's slots) outlive it: taken down
        # first, so that removing the directories never reaches into a mounted workspace.
        unmount_beneath(self.run_dir)
        unmount_beneath(str(self.tmp_path))
        shutil.rmtree(self.run_dir, ignore_errors=True)
