"""Egress benchmark: streamed calls through the egress proxy from a real agent container against the
same calls made directly from the host, to the same fake TLS upstream, in the same run.

Three processes besides this one: the fake upstream (baaaht.bus.testing.fake_llm), the proxy (as the
credential service runs it: real peer-credential identity, audit log, budgets) and the client
(bench/egress_client.py, stdlib only) in an agent container or on the host. Rounds alternate between
the two paths so that drift on this shared machine hits both alike. Figures: time to first byte of a
streamed Messages reply (p50, p99) and the throughput of a large streamed body. Targets (issue 11):
the proxy adds under 2 ms to the p50 time to first byte and keeps at least 0.8x of direct throughput.
Prints the figures and writes bench/results/egress.json. Needs the engine (make docker) and the agent
image (built when missing, as `make images` does).

    python bench/egress.py   # BENCH_ROUNDS, BENCH_REQUESTS, BENCH_STREAM_MB, BENCH_STREAMS, BENCH_AGENT_IMAGE
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import docker
from machine import finish, load_before  # bench/machine.py, beside this script

from baaaht.common import socket_group
from baaaht.common.identity import AgentIdentity, IdentityStore

ROOT = Path(__file__).resolve().parent
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
REQUESTS = int(os.environ.get("BENCH_REQUESTS", "200"))
STREAM_BYTES = int(float(os.environ.get("BENCH_STREAM_MB", "32")) * 1024 * 1024)
STREAMS = int(os.environ.get("BENCH_STREAMS", "5"))
AGENT_MOUNT = "/run/baaaht/agent"
LABEL = "baaaht.bench"
SESSION = "bench"
KEY = b"sk-bench-not-a-real-key"
START_TIMEOUT = 60.0


# -- the proxy's process ---------------------------------------------------------------------------


def serve_proxy(run_dir: str, data_dir: str, upstream: str, ca_file: str) -> None:
    """Run the proxy as the credential service would, with one fixed secret, until stdin closes."""
    from baaaht.schemas.config import BusConfig, Config, EgressConfig, EgressRoute
    from baaaht.services.credentials.egress.server import EgressServer
    from baaaht.services.credentials.source import Secret

    class OneSecret:
        def secret_for(self, name: str) -> Secret:
            return Secret(name=name, kind="api_key", version=1, value=KEY)

        def mark_used(self, name: str) -> None:
            pass

    class NoBus:
        def publish(self, event, subtopic: str = "") -> None:
            pass

    route = EgressRoute(
        name="anthropic",
        upstream=upstream,
        credential="anthropic",
        inject="x-api-key",
        methods=["POST", "GET"],
        paths=["/v1/messages", "/bytes"],
        roles=["agent"],
        usage="anthropic",
    )
    config = Config(
        data_dir=data_dir,
        bus=BusConfig(run_dir=run_dir),
        egress=EgressConfig(routes=[route], ca_file=ca_file),
    )
    server = EgressServer.for_config(config, OneSecret(), NoBus())
    server.start()
    print("ready", flush=True)
    sys.stdin.read()
    server.stop()


# -- the benchmark ---------------------------------------------------------------------------------


def started(command: list[str]) -> tuple[subprocess.Popen, str]:
    """A child process and the first line it printed."""
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline().strip()
    if not line:
        raise SystemExit(f"{command[:3]} did not start (exit {process.wait(5)})")
    return process, line


def agent_image() -> str:
    built = subprocess.run(
        [sys.executable, "-m", "baaaht.host.images", "agent"], capture_output=True, text=True, timeout=900
    )
    if built.returncode != 0:
        raise SystemExit(f"cannot build the agent image: {built.stderr.strip()}")
    return built.stdout.strip()


def client_arguments(target: str, prefix: str, ca_file: str) -> list[str]:
    return [target, prefix, ca_file, str(REQUESTS), str(STREAM_BYTES), str(STREAMS)]


def through_container(engine, image: str, run_dir: Path, gid: int) -> dict:
    container = engine.containers.create(
        image,
        command=[
            "python3",
            "/bench/egress_client.py",
            *client_arguments(f"unix:{AGENT_MOUNT}/egress.sock", "/anthropic", ""),
        ],
        volumes={
            str(run_dir / "agent"): {"bind": AGENT_MOUNT, "mode": "ro"},
            str(ROOT): {"bind": "/bench", "mode": "ro"},
        },
        network_mode="none",
        user="1000:1000",
        group_add=[str(gid)],
        read_only=True,
        labels={LABEL: "egress"},
    )
    identities = IdentityStore(str(run_dir))
    try:  # what the container manager does for every agent container, before it starts
        identities.put(
            AgentIdentity(
                container_id=container.id,
                session_id=SESSION,
                role="agent",
                install_id="bench",
                issued_at=time.time(),
            )
        )
        container.start()
        status = container.wait(timeout=600)
        output = container.logs(stdout=True, stderr=True).decode()
        if status["StatusCode"] != 0:
            raise SystemExit(f"the client in the container failed:\n{output}")
        return json.loads(output.strip().splitlines()[-1])
    finally:
        identities.remove(container.id)
        container.remove(force=True)


def direct(upstream: str, ca_file: str) -> dict:
    output = subprocess.run(
        [sys.executable, str(ROOT / "egress_client.py"), *client_arguments(upstream, "", ca_file)],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout
    return json.loads(output)


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(ttfb: list[float], rates: list[float]) -> dict:
    return {
        "ttfb_p50_ms": round(quantile(ttfb, 0.5) * 1000, 3),
        "ttfb_p99_ms": round(quantile(ttfb, 0.99) * 1000, 3),
        "throughput_mib_s": round(statistics.median(rates) / 2**20, 1),
    }


def main() -> None:
    machine_load = load_before()
    engine = docker.from_env(timeout=120)
    image = os.environ.get("BENCH_AGENT_IMAGE") or agent_image()
    gid = socket_group.ensure_gid(socket_group.DEFAULT_SOCKET_GROUP)
    with tempfile.TemporaryDirectory(prefix="bench-egress-") as scratch:
        scratch = Path(scratch)
        run_dir = scratch / "run"
        (run_dir / "agent").mkdir(parents=True)
        for directory in (run_dir, run_dir / "agent"):
            os.chown(directory, -1, gid)
            directory.chmod(0o750)
        upstream_process, upstream = started(
            [sys.executable, "-m", "baaaht.bus.testing.fake_llm", str(scratch / "upstream")]
        )
        ca_file = str(scratch / "upstream" / "ca.pem")
        proxy_process, _ = started(
            [sys.executable, __file__, "--proxy", str(run_dir), str(scratch / "data"), upstream, ca_file]
        )
        paths: dict[str, dict[str, list]] = {"proxy": {}, "direct": {}}
        try:
            for round_number in range(ROUNDS):
                for name in ("proxy", "direct") if round_number % 2 == 0 else ("direct", "proxy"):
                    found = (
                        through_container(engine, image, run_dir, gid)
                        if name == "proxy"
                        else direct(upstream, ca_file)
                    )
                    for key, values in found.items():
                        paths[name].setdefault(key, []).extend(values)
                print(f"round {round_number + 1}/{ROUNDS} done", file=sys.stderr)
        finally:
            for process in (proxy_process, upstream_process):
                process.stdin.close()
                process.wait(30)
    proxy, plain = (summary(paths[n]["ttfb"], paths[n]["throughput"]) for n in ("proxy", "direct"))
    results = {
        "rounds": ROUNDS,
        "requests_per_round": REQUESTS,
        "stream_bytes": STREAM_BYTES,
        "streams_per_round": STREAMS,
        "proxy_from_container": proxy,
        "direct_from_host": plain,
        "added_ttfb_p50_ms": round(proxy["ttfb_p50_ms"] - plain["ttfb_p50_ms"], 3),
        "throughput_ratio": round(proxy["throughput_mib_s"] / plain["throughput_mib_s"], 3),
        "targets": {"added_ttfb_p50_ms": "< 2", "throughput_ratio": ">= 0.8"},
        "image": image,
        "machine": finish(machine_load),
    }
    print(json.dumps(results, indent=2))
    out = ROOT / "results" / "egress.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {out}", file=sys.stderr)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--proxy"]:
        serve_proxy(*sys.argv[2:6])
    else:
        main()
