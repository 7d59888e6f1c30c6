"""Resource samples: one, or a stream of about one a second until the container stops."""

from __future__ import annotations

import time
from typing import Iterator

from baaaht.schemas.containers import StatsSample
from baaaht.services.containers.docker_runtime.connection import Connection
from baaaht.services.containers.docker_runtime.streams import EngineStream

ZERO_TIME = "0001-01-01T00:00:00Z"


class Stats:
    engine: Connection

    def stats(self, container: str) -> StatsSample:
        raw = self.engine.call("stats", container, lambda api: api.stats(container, stream=False))
        return stats_sample(raw, time.time())

    def stats_stream(self, container: str) -> EngineStream[StatsSample]:
        def parse(api, response) -> Iterator[StatsSample]:
            for raw in api._stream_helper(response, decode=True):
                if not sample_is_live(raw):
                    return
                yield stats_sample(raw, time.time())

        return self.engine.open_stream(
            "stats", container, "get", "/containers/{0}/stats", {"stream": 1}, parse
        )


def stats_sample(raw: dict, now: float) -> StatsSample:
    cpu, precpu = raw.get("cpu_stats") or {}, raw.get("precpu_stats") or {}
    cpu_delta = (cpu.get("cpu_usage") or {}).get("total_usage", 0) - (precpu.get("cpu_usage") or {}).get(
        "total_usage", 0
    )
    system_delta = cpu.get("system_cpu_usage", 0) - precpu.get("system_cpu_usage", 0)
    cpus = cpu.get("online_cpus") or len((cpu.get("cpu_usage") or {}).get("percpu_usage") or []) or 1
    cpu_percent = cpu_delta / system_delta * cpus * 100.0 if cpu_delta > 0 and system_delta > 0 else 0.0
    memory = raw.get("memory_stats") or {}
    memory_detail = memory.get("stats") or {}
    # Page cache is reclaimable: `docker stats` leaves it out, and so do we (cgroup v1 / v2 names).
    cache = memory_detail.get("total_inactive_file", memory_detail.get("inactive_file", 0))
    usage = max(0, memory.get("usage", 0) - cache)
    limit = memory.get("limit", 0)
    networks = (raw.get("networks") or {}).values()
    block_read = block_write = 0
    for entry in (raw.get("blkio_stats") or {}).get("io_service_bytes_recursive") or []:
        op = (entry.get("op") or "").lower()
        if op == "read":
            block_read += entry.get("value", 0)
        elif op == "write":
            block_write += entry.get("value", 0)
    return StatsSample(
        time=now,
        cpu_percent=round(cpu_percent, 3),
        memory_usage=usage,
        memory_limit=limit,
        memory_percent=round(usage / limit * 100.0, 3) if limit else 0.0,
        net_rx=sum(n.get("rx_bytes", 0) for n in networks),
        net_tx=sum(n.get("tx_bytes", 0) for n in networks),
        block_read=block_read,
        block_write=block_write,
        pids=(raw.get("pids_stats") or {}).get("current", 0),
    )


def sample_is_live(raw: dict) -> bool:
    """Docker keeps streaming zeroed samples (read time 0001-01-01) after a container stops."""
    return not (raw.get("read") or ZERO_TIME).startswith("0001-")
