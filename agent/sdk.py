"""An agent's connection to the bus: join, stay, and know when the bus is gone for too long."""

from __future__ import annotations

import asyncio
import logging
import time

from baaaht.agent.settings import AgentSettings
from baaaht.bus.aio import AsyncBusClient
from baaaht.bus.errors import BusError
from baaaht.schemas.bus import BusPing

log = logging.getLogger("baaaht.agent")
CONNECT_POLL = 0.05  # seconds between looks at whether the socket has connected yet


class BusLost(Exception):
    """No broker for longer than the agent's bus loss limit (or none answered in time to join)."""


class Agent:
    """One agent process on the bus. `call`, `call_raw`, `stream`, `publish` and `subscribe` are the
    asyncio client's own (bus/aio.py): the contract of every host client."""

    def __init__(self, settings: AgentSettings):
        self.settings = settings
        self.bus = AsyncBusClient(
            settings.bus,
            timeout=settings.call_timeout,
            heartbeat_interval=settings.heartbeat_interval,
            liveness=settings.liveness,
        )
        self.call, self.call_raw, self.stream = self.bus.call, self.bus.call_raw, self.bus.stream
        self.publish, self.subscribe = self.bus.publish, self.bus.subscribe
        self._stop = asyncio.Event()
        self._lost = asyncio.Event()
        self._watch: asyncio.Task | None = None

    @classmethod
    def from_env(cls, **overrides: float) -> "Agent":
        return cls(AgentSettings.from_env(**overrides))

    async def __aenter__(self) -> "Agent":
        try:
            await self.join()
        except BaseException:
            await self.bus.close()
            raise
        self._watch = asyncio.create_task(self._watch_bus(), name="baaaht-agent-bus-watch")
        return self

    async def __aexit__(self, *exc) -> None:
        if self._watch is not None:
            self._watch.cancel()
        await self.bus.close()

    async def join(self) -> None:
        """Return once the broker answers a ping (or stop() was called); BusLost if none answers within
        the bus loss limit."""
        deadline = time.monotonic() + self.settings.bus_loss_limit
        while (left := deadline - time.monotonic()) > 0 and not self._stop.is_set():
            if not self.bus.connected:
                await asyncio.sleep(CONNECT_POLL)  # the connection connects by itself
                continue
            try:
                await self.bus.call(BusPing(), timeout=min(left, self.settings.call_timeout))
            except BusError as error:  # connected, yet no answer (a broker starting or going away)
                log.info("the broker did not answer yet", extra={"error": str(error)})
                await asyncio.sleep(min(self.settings.heartbeat_interval, max(0.0, left)))
                continue
            log.info("joined the bus", extra={"bus": self.settings.bus})
            return
        if self._stop.is_set():
            return
        raise BusLost(f"no broker answered at {self.settings.bus} within {self.settings.bus_loss_limit:g}s")

    def stop(self) -> None:
        """Ask `stopped()` to return (SIGTERM's handler calls this)."""
        self._stop.set()

    async def stopped(self) -> None:
        """Wait until stop() is called; BusLost when the bus is gone for longer than the limit first."""
        stop = asyncio.create_task(self._stop.wait())
        lost = asyncio.create_task(self._lost.wait())
        try:
            await asyncio.wait([stop, lost], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            lost.cancel()
        if self._lost.is_set() and not self._stop.is_set():
            raise BusLost(f"no broker at {self.settings.bus} for {self.settings.bus_loss_limit:g}s")

    async def _watch_bus(self) -> None:
        # The connection reconnects by itself; this only measures how long it has been without a broker.
        check = min(self.settings.heartbeat_interval, self.settings.bus_loss_limit / 4)
        lost_since: float | None = None
        while True:
            now = time.monotonic()
            if self.bus.connected:
                if lost_since is not None:
                    log.info("back on the bus", extra={"away_seconds": round(now - lost_since, 3)})
                lost_since = None
            elif lost_since is None:
                lost_since = now
                log.warning("lost the bus", extra={"bus": self.settings.bus})
            elif now - lost_since > self.settings.bus_loss_limit:
                log.error("the bus is gone for too long", extra={"limit": self.settings.bus_loss_limit})
                self._lost.set()
                return
            await asyncio.sleep(check)
