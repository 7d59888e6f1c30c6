"""A host test worker of the task scheduler, on the worker library (baaaht.bus.worker).

    python tests/services/task_worker.py --config FILE --queues a,b --slots 2 --record FILE [--worker-id ID]

Every handler start, cancel and end is appended to the record file as a JSON line (written before the
outcome is reported, so a test that saw the task's event finds the line). Handlers by task type:
noop, echo (returns the payload), sleep ({"seconds"}), fail (ValueError), flaky (fails while the attempt
is at most {"fail_times"}), fatal (NonRetryableError), block (until cancelled), hold_first (blocks on the
first attempt only), freeze ({"seconds"}: blocks the whole event loop, so no heartbeat goes out),
chatter (streams chunks b"<n>" as progress, one every few ms, until the file {"gate"} exists, then
{"after"} more; returns how many it sent).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

from baaaht.bus.aio import AsyncBusClient
from baaaht.bus.worker import NonRetryableError, Worker, WorkerTask
from baaaht.common.config import load_config


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--queues", required=True)
    parser.add_argument("--slots", type=int, default=1)
    parser.add_argument("--record", required=True)
    parser.add_argument("--worker-id", default="")
    args = parser.parse_args()
    config, _ = load_config(args.config, env={})
    worker_id = args.worker_id or f"test-worker-{os.getpid()}"

    def record(what: str, task: WorkerTask, **extra) -> None:
        line = {
            "what": what,
            "task": task.id,
            "type": task.type,
            "attempt": task.attempt,
            "worker": worker_id,
        }
        with open(args.record, "a") as out:
            out.write(json.dumps({**line, "time": time.time(), **extra}) + "\n")

    def recorded(handler):
        async def run(task: WorkerTask):
            record("start", task)
            try:
                result = await handler(task)
            except asyncio.CancelledError:
                record("cancelled", task)
                raise
            except Exception as exc:
                record("failed", task, error=str(exc))
                raise
            record("done", task)
            return result

        return run

    async def noop(task):
        return None

    async def echo(task):
        return task.payload

    async def sleep(task):
        await asyncio.sleep(task.payload["seconds"])

    async def fail(task):
        raise ValueError((task.payload or {}).get("message", "it failed"))

    async def flaky(task):
        if task.attempt <= task.payload["fail_times"]:
            raise ValueError(f"attempt {task.attempt} fails")
        return task.attempt

    async def fatal(task):
        raise NonRetryableError("this cannot work")

    async def coded(task):
        raise NonRetryableError("no such thing", error_type="NOT_FOUND")

    async def block(task):
        await asyncio.Event().wait()

    async def hold_first(task):
        if task.attempt == 1:
            await asyncio.Event().wait()
        return task.attempt

    async def chatter(task):
        sent = 0
        while not os.path.exists(task.payload["gate"]):
            if sent >= 5000:
                raise ValueError("the gate never opened")
            sent += 1
            task.progress(str(sent).encode())
            await asyncio.sleep(0.005)
        for _ in range(task.payload["after"]):
            sent += 1
            task.progress(str(sent).encode())  # many at once: coalesced into few calls
        return sent

    async def freeze(task):
        time.sleep(task.payload["seconds"])  # the event loop stops: no heartbeat goes out

    handlers = {
        name: recorded(fn)
        for name, fn in dict(
            noop=noop,
            echo=echo,
            sleep=sleep,
            fail=fail,
            flaky=flaky,
            fatal=fatal,
            coded=coded,
            block=block,
            hold_first=hold_first,
            freeze=freeze,
            chatter=chatter,
        ).items()
    }

    async def run() -> None:
        async with AsyncBusClient.for_config(config) as bus:
            worker = Worker(bus, args.queues.split(","), args.slots, handlers, worker_id=worker_id)
            await worker.run()

    asyncio.run(run())


if __name__ == "__main__":
    main()
