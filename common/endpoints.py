"""Where the broker's sockets live, derived from the `bus` config section."""

from __future__ import annotations

import os
from dataclasses import dataclass

from baaaht.schemas.config import BusConfig

AGENT_DIR = "agent"


@dataclass(frozen=True)
class Endpoints:
    run_dir: str
    services: str
    events: str
    agents: str
    tcp_services: str = ""
    tcp_events: str = ""
    tcp_agents: str = ""

    @classmethod
    def for_config(cls, bus: BusConfig) -> "Endpoints":
        run_dir = os.path.abspath(os.path.expanduser(bus.run_dir))
        tcp = (
            {f"tcp_{name}": endpoint for name, endpoint in tcp_endpoints(bus).items()}
            if bus.tcp_enabled
            else {}
        )
        return cls(
            run_dir=run_dir,
            services=f"ipc://{run_dir}/bus.sock",
            events=f"ipc://{run_dir}/events.sock",
            # Agents get their own directory: it is the only thing mounted into agent containers.
            agents=f"ipc://{run_dir}/{AGENT_DIR}/bus.sock",
            **tcp,
        )

    @property
    def agent_dir(self) -> str:
        return os.path.join(self.run_dir, AGENT_DIR)


def tcp_endpoints(bus: BusConfig) -> dict[str, str]:
    """The broker's tcp:// endpoints by socket (services, events, agents), on tcp_host from tcp_port."""
    base = f"tcp://{bus.tcp_host}"
    return {
        "services": f"{base}:{bus.tcp_port}",
        "events": f"{base}:{bus.tcp_port + 1}",
        "agents": f"{base}:{bus.tcp_port + 2}",
    }


def ipc_path(endpoint: str) -> str | None:
    return endpoint[len("ipc://") :] if endpoint.startswith("ipc://") else None
