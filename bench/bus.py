"""Bus benchmark: the broker against a direct DEALER-to-ROUTER baseline, in one run.

Round trips of a trivial request (301-byte body, as in verified-facts.md) with 1
and 100 outstanding, through the broker and directly; then event fan-out to 1 and
4 subscribers. Every peer is its own process (as in production), so the numbers
include no GIL contention between the peers. Prints a table and writes
bench/results/bus.json, ratios included. Ratios matter more than absolute
numbers: the machine is shared and noisy.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import zmq

from baaaht.bus import wire
from baaaht.schemas.bus import Register

ROOT = Path(__file__).resolve().parent
BODY = b"x" * 301
ROUND_SECONDS = float(os.environ.get("BENCH_SECONDS", "2"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
EVENTS = int(os.environ.get("BENCH_EVENTS", "50000"))


# -- peers (each runs in its own process) ---------------------------------------------------------


def echo_router(endpoint: str) -> None:
    """The baseline server: a ROUTER answering each request directly."""
    sock = zmq.Context().socket(zmq.ROUTER)
    sock.bind(endpoint)
    while True:
        ident, envelope = sock.recv_multipart()
        header, body = wire.split(envelope)
        sock.send_multipart([ident, wire.reply(wire.REPLY, wire.request_header.decode(header).id, body)])


def echo_service(endpoint: str) -> None:
    """The same work behind the broker: a registered service instance (with heartbeats)."""
    sock = zmq.Context().socket(zmq.DEALER)
    sock.connect(endpoint)
    register = Register(
        service="bench", instance=f"bench-{os.getpid()}", methods=["bench.echo"], concurrency=1
    )
    sock.send(wire.pack(wire.REGISTER, body=msgspec.msgpack.encode(register)))
    health = msgspec.msgpack.encode({"healthy": True})
    next_beat = 0.0
    while True:
        if sock.poll(100):
            frames = sock.recv_multipart()
            if wire.kind_of(frames[0]) == wire.REQUEST:
                envelope, route = frames
                header, body = wire.split(envelope)
                request_id = wire.request_header.decode(header).id
                sock.send(wire.reply(wire.REPLY, request_id, body, token=route[: wire.TOKEN_SIZE]))
        if time.monotonic() >= next_beat:
            sock.send(wire.pack(wire.HEARTBEAT, body=health))
            next_beat = time.monotonic() + 0.5


def subscriber(endpoint: str, expected: int, results) -> None:
    sock = zmq.Context().socket(zmq.SUB)
    sock.setsockopt(zmq.SUBSCRIBE, b"bench.")
    sock.setsockopt(zmq.RCVHWM, 100_000)
    sock.connect(endpoint)
    results.put("ready")
    received, first, last = 0, 0.0, 0.0
    while received < expected and sock.poll(2000):
        sock.recv_multipart()
        received += 1
        last = time.perf_counter()
        first = first or last
    results.put((received, last - first))


# -- the driver ----------------------------------------------------------------------------------


def round_trips(endpoint: str, target: str, outstanding: int, seconds: float) -> dict:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    sent_at: dict[str, float] = {}
    latencies: list[float] = []
    counter = 0

    def send() -> None:
        nonlocal counter
        counter += 1
        request_id = format(counter, "x")
        sent_at[request_id] = time.perf_counter()
        sock.send(wire.request(request_id, target, time.time() + 30, "", False, BODY))

    for _ in range(outstanding):
        send()
    warmup_until = time.perf_counter() + 0.5
    started = stop_at = None
    done = 0
    while True:
        if not sock.poll(5000):
            raise RuntimeError(f"no reply from {endpoint}")
        envelope = sock.recv()
        if wire.kind_of(envelope) != wire.REPLY:
            continue  # the broker's heartbeats
        now = time.perf_counter()
        header = wire.header_of(envelope)
        reply = wire.reply_header.decode(header)
        if reply.error:
            raise RuntimeError(f"error reply {reply.error}")
        began = sent_at.pop(reply.id)
        if started is None and now >= warmup_until:
            started, stop_at = now, now + seconds
        if started is not None:
            latencies.append(now - began)
            done += 1
            if now >= stop_at:
                break
        send()
    elapsed = time.perf_counter() - started
    sock.close(0)
    latencies.sort()
    return {
        "round_trips_per_s": done / elapsed,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
    }


def fan_out(publish_endpoint: str, events_endpoint: str, subscribers: int) -> dict:
    spawn = multiprocessing.get_context("spawn")
    results = spawn.Queue()
    procs = [
        spawn.Process(target=subscriber, args=(events_endpoint, EVENTS, results)) for _ in range(subscribers)
    ]
    for proc in procs:
        proc.start()
    for _ in procs:
        results.get(timeout=30)
    time.sleep(0.5)  # let the SUB connections complete their subscription
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.connect(publish_endpoint)
    body = msgspec.msgpack.encode({"type": "bench.tick", "n": 0})
    for _ in range(EVENTS):
        sock.send(wire.pack(wire.EVENT, b"bench.tick", body))
    counts = [results.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(10)
    sock.close(0)
    received = sum(c for c, _ in counts)
    slowest = max(s for _, s in counts) or 1e-9
    return {
        "subscribers": subscribers,
        "delivered_per_s": received / slowest,
        "per_subscriber_per_s": received / subscribers / slowest,
        "lost_pct": 100.0 * (1 - received / (EVENTS * subscribers)),
    }


def main() -> None:
    run_dir = tempfile.mkdtemp(prefix="bh-bench-")
    config = Path(run_dir) / "config.json"
    config.write_text(
        json.dumps({"data_dir": run_dir, "bus": {"run_dir": run_dir}, "log": {"level": "warn"}})
    )
    services = f"ipc://{run_dir}/bus.sock"
    direct = f"ipc://{run_dir}/direct.sock"
    broker = subprocess.Popen([sys.executable, "-m", "baaaht.bus.broker", "--config", str(config)])
    spawn = multiprocessing.get_context("spawn")
    peers = [
        spawn.Process(target=echo_router, args=(direct,), daemon=True),
        spawn.Process(target=echo_service, args=(services,), daemon=True),
    ]
    for peer in peers:
        peer.start()
    time.sleep(1.5)
    rows = {}
    rounds: dict[int, list[float]] = {1: [], 100: []}
    try:
        for outstanding in (1, 100):
            # Alternate the two paths and compare each pair: the machine is shared and noisy, and a
            # ratio taken from neighbouring rounds holds up better than two separate averages.
            samples = {"direct": [], "broker": []}
            for _ in range(ROUNDS):
                samples["direct"].append(round_trips(direct, "bench.echo", outstanding, ROUND_SECONDS))
                samples["broker"].append(round_trips(services, "bench.echo", outstanding, ROUND_SECONDS))
                rounds[outstanding].append(
                    samples["broker"][-1]["round_trips_per_s"] / samples["direct"][-1]["round_trips_per_s"]
                )
            for path, runs in samples.items():
                rows[f"{path}_{outstanding}"] = {
                    key: statistics.median(run[key] for run in runs) for key in runs[0]
                }
        for count in (1, 4):
            rows[f"fanout_{count}"] = fan_out(services, f"ipc://{run_dir}/events.sock", count)
    finally:
        for peer in peers:
            peer.terminate()
        broker.terminate()
        broker.wait(10)
        shutil.rmtree(run_dir, ignore_errors=True)
    ratios = {f"broker_vs_direct_{n}": statistics.median(rounds[n]) for n in (1, 100)}
    targets = {
        "broker_vs_direct_100 >= 0.6": ratios["broker_vs_direct_100"] >= 0.6,
        "broker p99 at 1 outstanding < 1 ms": rows["broker_1"]["p99_ms"] < 1.0,
    }
    print(f"{'path':<12} {'outstanding':>11} {'round trips/s':>14} {'p50 ms':>8} {'p99 ms':>8}")
    for n in (1, 100):
        for path in ("direct", "broker"):
            r = rows[f"{path}_{n}"]
            print(
                f"{path:<12} {n:>11} {r['round_trips_per_s']:>14.0f} {r['p50_ms']:>8.3f} {r['p99_ms']:>8.3f}"
            )
    for name, value in ratios.items():
        each = ", ".join(f"{r:.2f}" for r in rounds[int(name.rsplit("_", 1)[1])])
        print(f"{name}: {value:.2f} (median of rounds: {each})")
    for count in (1, 4):
        r = rows[f"fanout_{count}"]
        print(
            f"fan-out to {count}: {r['delivered_per_s']:.0f} events/s delivered "
            f"({r['per_subscriber_per_s']:.0f} per subscriber, {r['lost_pct']:.1f}% lost at the HWM)"
        )
    for name, met in targets.items():
        print(f"target {name}: {'met' if met else 'NOT met'}")
    out = ROOT / "results" / "bus.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(
        json.dumps(
            {"when": time.time(), "rows": rows, "ratios": ratios, "ratio_rounds": rounds, "targets": targets},
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
