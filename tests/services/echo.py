"""A test service for bus tests: echo, slow calls, streams, failures and events."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import ClassVar, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from a checkout

from baaaht.bus.client import BusClient  # noqa: E402
from baaaht.bus.errors import BusError  # noqa: E402
from baaaht.bus.runner import main  # noqa: E402
from baaaht.bus.service import CallContext, Publisher, Service, on_event, rpc  # noqa: E402
from baaaht.schemas.base import Event, Request, Response  # noqa: E402
from baaaht.schemas.config import Config  # noqa: E402
from baaaht.schemas.errors import ErrorCode  # noqa: E402


class Said(Response, kw_only=True):
    text: str
    pid: int
    caller_socket: str = ""
    caller_uid: int = -1


class Say(Request, tag="echo.say", kw_only=True):
    response: ClassVar[type] = Said
    text: str
    delay: float = 0.0


class Tick(Response, kw_only=True):
    n: int


class Count(Request, tag="echo.count", kw_only=True):
    response: ClassVar[type] = Tick
    to: int
    interval: float = 0.0


class Fail(Request, tag="echo.fail", kw_only=True):
    code: str = ""


class Shout(Event, tag="echo.shouted", kw_only=True):
    text: str


class Emit(Request, tag="echo.emit", kw_only=True):
    text: str
    times: int = 1


class Seen(Response, kw_only=True):
    topics: list[str]
    cancelled_streams: int
    reloads: int = 0


class SeenQuery(Request, tag="echo.seen", kw_only=True):
    response: ClassVar[type] = Seen


class EchoService(Service):
    name = "echo"
    concurrency = 16

    def __init__(self, events: Publisher):
        self.events = events
        self.seen: list[str] = []
        self.cancelled_streams = 0
        self.reloads = 0
        self.lock = threading.Lock()

    @classmethod
    def from_config(cls, config: Config, bus: BusClient) -> "EchoService":
        return cls(events=bus)

    def on_reload(self) -> None:
        with self.lock:
            self.reloads += 1

    @rpc
    def say(self, request: Say, context: CallContext) -> Said:
        deadline = time.monotonic() + request.delay
        while (remaining := deadline - time.monotonic()) > 0:
            context.check()
            context.cancelled.wait(max(0.0, min(remaining, context.remaining())))  # wakes at a cancel
        return Said(
            text=request.text,
            pid=os.getpid(),
            caller_socket=context.caller.socket,
            caller_uid=context.caller.uid,
        )

    @rpc(stream=True)
    def count(self, request: Count, context: CallContext) -> Iterator[Tick]:
        try:
            for n in range(request.to):
                yield Tick(n=n)
                context.cancelled.wait(request.interval)  # paced, and ended at once by a cancel
        finally:
            if context.cancelled.is_set():
                with self.lock:
                    self.cancelled_streams += 1

    @rpc
    def fail(self, request: Fail) -> None:
        if request.code:
            raise BusError(ErrorCode(request.code), "asked to fail", {"asked": request.code})
        raise RuntimeError("boom")

    @rpc
    def emit(self, request: Emit) -> None:
        for _ in range(request.times):
            self.events.publish(Shout(text=request.text), subtopic="loud")

    @rpc
    def seen_query(self, request: SeenQuery) -> Seen:
        with self.lock:
            return Seen(
                topics=list(self.seen), cancelled_streams=self.cancelled_streams, reloads=self.reloads
            )

    @on_event("echo.*")
    def on_shout(self, event: Shout) -> None:
        with self.lock:
            self.seen.append(event.text)


if __name__ == "__main__":
    main(EchoService)
