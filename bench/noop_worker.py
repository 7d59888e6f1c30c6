"""One worker process of bench/scheduler.py's throughput run: the worker library taking no-op tasks.

python bench/noop_worker.py QUEUE SLOTS WORKER_ID --config FILE
"""

from __future__ import annotations

import argparse
import asyncio

from baaaht.bus.aio import AsyncBusClient
from baaaht.bus.worker import Worker
from baaaht.common.config import load_config


async def noop(task) -> None:
    return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("queue")
    parser.add_argument("slots", type=int)
    parser.add_argument("worker_id")
    parser.add_argument("--config", required=True)
    args = parser.parse_args()
    config, _ = load_config(args.config, env={})

    async def run() -> None:
        async with AsyncBusClient.for_config(config, timeout=30) as bus:
            await Worker(bus, [args.queue], args.slots, {"noop": noop}, worker_id=args.worker_id).run()

    asyncio.run(run())


if __name__ == "__main__":
    main()
