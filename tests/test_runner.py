"""The service runner's life cycle, background work and signals, against a real broker."""

from __future__ import annotations

import signal
import threading
import time
from typing import ClassVar

import pytest

from baaaht.bus.background import Stopping, background
from baaaht.bus.client import BusClient
from baaaht.bus.runner import STARTING, ServiceRunner
from baaaht.bus.service import Service, rpc
from baaaht.bus.testing import wait_for
from baaaht.common.endpoints import Endpoints
from baaaht.schemas.base import Empty, Request
from baaaht.schemas.bus import BusServices, BusStats
from tests.conftest import ECHO_SERVICE
from tests.services.echo import Say, SeenQuery


class Note(Request, tag="ordered.note", kw_only=True):
    response: ClassVar[type] = Empty
    text: str


def instance_state(probe: BusClient, service: str) -> tuple[bool, str] | None:
    """(healthy, reason) of the service's one instance as the broker sees it; None if not registered."""
    for found in probe.call(BusServices(service=service)).services:
        for instance in found.instances:
            return instance.healthy, instance.reason
    return None


class Ordered(Service):
    """Records each step of its life with what the broker said about it at that moment."""

    name = "ordered"

    def __init__(self, probe: BusClient):
        self.probe = probe
        self.steps: list[tuple[str, tuple[bool, str] | None]] = []

    def step(self, what: str) -> None:
        self.steps.append((what, instance_state(self.probe, self.name)))

    def on_start(self) -> None:
        self.step("on_start")

    @background
    def follow(self, stopping: Stopping) -> None:
        self.step("background started")
        stopping.wait(30)
        self.step("background stopped")

    @rpc
    def note(self, request: Note) -> Empty:
        self.step(request.text)
        return Empty()

    def on_stop(self) -> None:
        self.step("on_stop")


def serve_in_thread(runner: ServiceRunner, service: Service) -> threading.Thread:
    thread = threading.Thread(target=runner.run, args=(service,), daemon=True)
    thread.start()
    return thread


def test_the_life_cycle_runs_in_order_around_registration(host):
    probe = host.client()
    runner = ServiceRunner(Ordered, Endpoints.for_config(host.config.bus), heartbeat_interval=0.2)
    service = Ordered(probe)
    thread = serve_in_thread(runner, service)
    wait_for(lambda: instance_state(probe, "ordered") == (True, ""), what="the service to be healthy")
    host.client().call(Note(text="request"))
    runner.stop()
    thread.join(30)
    assert not thread.is_alive()
    steps = [what for what, _ in service.steps]
    assert steps == ["on_start", "background started", "request", "background stopped", "on_stop"]
    states = dict(service.steps)
    assert states["on_start"] == (False, STARTING)  # registered, but nothing is routed to it yet
    assert states["background started"] is not None  # started after registration...
    assert states["background stopped"] is not None  # ...and stopped before unregistering
    assert states["on_stop"] == (False, "shutting down")  # unregistered only after on_stop
    wait_for(lambda: instance_state(probe, "ordered") is None, what="the instance to unregister")


class SlowToStop(Service):
    name = "slowtostop"

    def __init__(self, heartbeats: float):
        self.heartbeats = heartbeats

    def on_stop(self) -> None:
        time.sleep(self.heartbeats)  # several health heartbeats go out meanwhile


def test_a_service_leaves_once_however_long_its_on_stop_takes(host):
    client = host.client()
    since = client.call(BusStats()).last_event_seq
    runner = ServiceRunner(SlowToStop, Endpoints.for_config(host.config.bus), heartbeat_interval=0.1)
    with client.subscribe(["bus.service."], since=since) as subscription:
        thread = serve_in_thread(runner, SlowToStop(heartbeats=0.5))
        seen = [subscription.next(timeout=10).event]
        runner.stop()
        thread.join(30)
        assert not thread.is_alive()
        while (delivery := subscription.next(timeout=1.0)) is not None:  # what follows the stop
            seen.append(delivery.event)
    instance = runner.instance_id
    assert [(type(e).__name__, e.service, e.instance) for e in seen] == [
        ("ServiceUp", "slowtostop", instance),
        ("ServiceDown", "slowtostop", instance),
    ]


class Failing(Service):
    name = "failing"

    @background(every=3600.0, marks_unhealthy=True)
    def refresh(self) -> None:
        raise OSError("the disk is gone")


def test_a_failing_background_task_shows_in_the_health_the_broker_has(host):
    probe = host.client()
    runner = ServiceRunner(Failing, Endpoints.for_config(host.config.bus), heartbeat_interval=0.2)
    thread = serve_in_thread(runner, Failing())
    try:
        state = wait_for(
            lambda: (s := instance_state(probe, "failing")) and not s[0] and s[1] != STARTING and s,
            what="the failure to reach the broker",
        )
        assert state[1].startswith("background task refresh failing since ")
        assert state[1].endswith("(1 failure in a row): OSError: the disk is gone")
    finally:
        runner.stop()
        thread.join(30)


def test_a_started_service_must_be_the_runners_type(host):
    runner = ServiceRunner(Failing, Endpoints.for_config(host.config.bus), heartbeat_interval=0.2)
    try:
        with pytest.raises(TypeError, match="Failing runner cannot serve a Ordered"):
            runner.run(Ordered(host.client()))
    finally:
        runner.close()


def test_sighup_reloads_and_sigterm_or_sigint_stop_the_process(echo):
    client = echo.client()
    process = echo.processes["echo"]
    for expected in (1, 2):
        process.send_signal(signal.SIGHUP)
        wait_for(lambda: client.call(SeenQuery()).reloads == expected, what=f"reload {expected}")  # noqa: B023
    assert client.call(Say(text="still here")).pid == process.pid  # reloaded, not restarted
    process.send_signal(signal.SIGINT)
    assert process.wait(20) == 0
    again = echo.start_service(ECHO_SERVICE, "echo")
    again.send_signal(signal.SIGTERM)
    assert again.wait(20) == 0


def test_a_request_on_its_way_when_the_stop_comes_is_answered_not_dropped(host):
    from tests.services.echo import EchoService

    probe = host.client()
    # liveness as the test kit's: the I/O thread is held here for a second, which is no broker's silence
    runner = ServiceRunner(
        EchoService, Endpoints.for_config(host.config.bus), heartbeat_interval=0.2, liveness=25
    )
    arrived, let_in = threading.Event(), threading.Event()
    deliver = runner._on_message

    def held_in_transit(kind: bytes, envelope: bytes, extra: list[bytes]) -> None:
        if extra and not arrived.is_set():  # the first request: routed by the broker, not seen here yet
            arrived.set()
            let_in.wait(10)
        deliver(kind, envelope, extra)

    runner.connection.core._on_message = held_in_transit
    closed, close = threading.Event(), runner.queue.close

    def closing() -> None:  # the drain is over: the handlers stop taking calls
        closed.set()
        close()

    runner.queue.close = closing
    thread = serve_in_thread(runner, EchoService(events=runner.bus))
    try:
        wait_for(lambda: instance_state(probe, "echo") == (True, ""), what="the service to be healthy")
        results: list[object] = []
        caller = threading.Thread(target=lambda: results.append(host.client(timeout=10).call(Say(text="hi"))))
        caller.start()
        assert arrived.wait(10)
        runner.stop()  # the drain starts while the request is still in the I/O thread's hands
        # A drain that does not wait for it is over at once; one that does is still waiting at 0.5 s.
        closed.wait(0.5)
        let_in.set()
        caller.join(15)
        assert [getattr(r, "text", r) for r in results] == ["hi"]
    finally:
        let_in.set()
        runner.stop()
        thread.join(30)
