"""Container benchmark: create+start+wait+remove of a trivial command through the bus (broker, policy
and container services, each its own process) against the same with the docker SDK directly.

Both paths create exactly the same container: the direct path replays the spec the container service
produced (hardened, labelled, with the agent bus mount), so the ratio is the orchestrator's overhead.
Rounds alternate between the paths so that drift on this shared, noisy machine hits both alike.
Prints the figures and writes bench/results/containers.json. Needs the engine (make docker).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import docker
import msgspec

from baaaht.bus.testing import Host
from baaaht.host.images import ensure_busybox_image
from baaaht.schemas.containers import (
    ContainerCreate,
    ContainerDestroy,
    ContainerSpec,
    ContainerStart,
    ContainerWait,
)
from baaaht.schemas.sessions import SessionCreate
from baaaht.services.containers.docker_runtime.spec import create_args
from baaaht.services.containers.ownership import LABEL_INSTALL

ROOT = Path(__file__).resolve().parent

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "20"))
CONCURRENT = int(os.environ.get("BENCH_CONCURRENT", "10"))
CONCURRENT_REPEATS = int(os.environ.get("BENCH_CONCURRENT_REPEATS", "3"))
COMMAND = ["true"]


class BusPath:
    def __init__(self, host: Host, image: str):
        self.bus = host.client(timeout=60)
        self.session = self.bus.call(SessionCreate(owner="bench")).id
        self.image = image

    def create_request(self) -> ContainerCreate:
        return ContainerCreate(spec=ContainerSpec(image=self.image, command=COMMAND), session_id=self.session)

    def lifecycle(self) -> None:
        container = self.bus.call(self.create_request()).id
        self.bus.call(ContainerStart(id=container))
        exit_code = self.bus.call(ContainerWait(id=container)).exit_code
        self.bus.call(ContainerDestroy(id=container))
        assert exit_code == 0


class DirectPath:
    def __init__(self, api: docker.APIClient, spec: ContainerSpec):
        self.api = api
        self.spec = spec

    def lifecycle(self) -> None:
        spec = msgspec.structs.replace(self.spec, name=f"baaaht-bench-{uuid.uuid4().hex[:12]}")
        container = self.api.create_container(**create_args(spec, self.api._version))["Id"]
        self.api.start(container)
        exit_code = self.api.wait(container)["StatusCode"]
        self.api.remove_container(container)
        assert exit_code == 0


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def concurrently(lifecycle) -> float:
    with concurrent.futures.ThreadPoolExecutor(CONCURRENT) as pool:
        started = time.perf_counter()
        for future in [pool.submit(lifecycle) for _ in range(CONCURRENT)]:
            future.result()
        return time.perf_counter() - started


def main() -> None:
    client = docker.from_env(timeout=120)
    image = ensure_busybox_image(client)
    with tempfile.TemporaryDirectory(prefix="baaaht-bench-") as tmp:
        host = Host(
            Path(tmp),
            {
                "policy": {"max_containers": 4 * CONCURRENT},
                "log": {"level": "warn"},
                "runtime": {"max_concurrent_ops": 8},
            },
        )
        host.start_broker()
        install_label = ""
        try:
            for module, service in (
                ("baaaht.services.policy", "policy"),
                ("baaaht.services.sessions", "session"),
                ("baaaht.services.containers", "container"),
            ):
                host.start_service(module, service=service)
            install_label = f"{LABEL_INSTALL}={(host.data_dir / 'install-id').read_text().strip()}"
            bus_path = BusPath(host, image)
            # The direct path creates what the service would: take the spec from one real create.
            sample = bus_path.bus.call(bus_path.create_request())
            bus_path.bus.call(ContainerDestroy(id=sample.id))
            direct_path = DirectPath(client.api, sample.spec)
            bus_path.lifecycle(), direct_path.lifecycle()  # warm-up: connections, caches
            bus_times, direct_times = [], []
            for _ in range(ROUNDS):
                bus_times.append(timed(bus_path.lifecycle))
                direct_times.append(timed(direct_path.lifecycle))
            bus_wall, direct_wall = [], []
            for _ in range(CONCURRENT_REPEATS):
                bus_wall.append(concurrently(bus_path.lifecycle))
                direct_wall.append(concurrently(direct_path.lifecycle))
        finally:
            if install_label:
                for leftover in client.containers.list(
                    all=True, sparse=True, filters={"label": install_label}
                ):
                    leftover.remove(force=True)
            host.stop()
    bus_median, direct_median = statistics.median(bus_times), statistics.median(direct_times)
    results = {
        "rounds": ROUNDS,
        "sequential_ms": {
            "bus_median": round(bus_median * 1000, 1),
            "direct_median": round(direct_median * 1000, 1),
            "ratio": round(bus_median / direct_median, 3),
            "bus_all": [round(t * 1000, 1) for t in bus_times],
            "direct_all": [round(t * 1000, 1) for t in direct_times],
        },
        "concurrent": {
            "lifecycles": CONCURRENT,
            "repeats": CONCURRENT_REPEATS,
            "bus_median_s": round(statistics.median(bus_wall), 3),
            "direct_median_s": round(statistics.median(direct_wall), 3),
            "ratio": round(statistics.median(bus_wall) / statistics.median(direct_wall), 3),
        },
        "target_ratio": 1.1,
        "cpus": os.cpu_count(),
    }
    out = ROOT / "results" / "containers.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    seq, conc = results["sequential_ms"], results["concurrent"]
    print(f"create+start+wait+remove, median of {ROUNDS}:")
    print(f"  bus    {seq['bus_median']:8.1f} ms")
    print(f"  direct {seq['direct_median']:8.1f} ms   ratio {seq['ratio']:.3f} (target <= 1.1)")
    print(f"{CONCURRENT} concurrent lifecycles, median of {CONCURRENT_REPEATS}:")
    print(f"  bus    {conc['bus_median_s']:8.3f} s")
    print(f"  direct {conc['direct_median_s']:8.3f} s    ratio {conc['ratio']:.3f}")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
