"""An agent's settings, from its environment: the container manager sets BAAAHT_BUS; the rest has
defaults an agent may override (durations written as in the host's config: `30s`, `250ms`)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from baaaht.common.units import DURATION_EXPECTED, parse_duration

BUS = "BAAAHT_BUS"
BUS_LOSS_LIMIT = "BAAAHT_BUS_LOSS_LIMIT"
HEARTBEAT_INTERVAL = "BAAAHT_HEARTBEAT_INTERVAL"
CALL_TIMEOUT = "BAAAHT_CALL_TIMEOUT"


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names it."""


@dataclass(frozen=True)
class AgentSettings:
    bus: str  # the agent socket's address inside the container, e.g. ipc:///run/baaaht/agent/bus.sock
    bus_loss_limit: float = 30.0  # seconds without a broker (or before the first) before the agent exits
    heartbeat_interval: float = 1.0
    liveness: int = 3  # heartbeat intervals of a silent broker before the socket is replaced
    call_timeout: float = 10.0

    def __post_init__(self) -> None:
        if not self.bus.startswith(("ipc://", "tcp://")):
            raise SettingsError(
                f"{BUS}={self.bus!r}: expected an ipc:// or tcp:// address of the agent socket"
            )
        for name, value in [
            (BUS_LOSS_LIMIT, self.bus_loss_limit),
            (HEARTBEAT_INTERVAL, self.heartbeat_interval),
            (CALL_TIMEOUT, self.call_timeout),
        ]:
            if value <= 0:
                raise SettingsError(f"{name}={value!r}: expected a duration above zero, like 30s")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ, **overrides: float) -> "AgentSettings":
        """Settings from the environment; `overrides` (e.g. from flags) beat it."""
        bus = environ.get(BUS, "")
        if not bus:
            raise SettingsError(
                f"{BUS} is not set: it names the agent socket, and the container manager sets it in every "
                "container it starts with the agent bus"
            )
        durations = {
            "bus_loss_limit": _duration(environ, BUS_LOSS_LIMIT),
            "heartbeat_interval": _duration(environ, HEARTBEAT_INTERVAL),
            "call_timeout": _duration(environ, CALL_TIMEOUT),
        }
        given = {key: value for key, value in {**durations, **overrides}.items() if value is not None}
        return cls(bus=bus, **given)


def _duration(environ: Mapping[str, str], name: str) -> float | None:
    if name not in environ:
        return None
    try:
        return float(parse_duration(environ[name]))
    except ValueError:
        raise SettingsError(f"{name}={environ[name]!r} {DURATION_EXPECTED}") from None
