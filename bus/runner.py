"""Runs a Service on the bus: registration, its life cycle and signals, decoding, bounded
concurrency, streaming, cancellation, event handlers, background work and graceful shutdown.

Handlers run on threads rather than an event loop: the docker SDK, sqlite3 and
file I/O all block, and a fixed set of handler threads bounds how many run at once
(the `concurrency` the service registers with). The connection's I/O thread runs only
the handlers declared inline (bus/service.py rpc: they never wait), and those only for a
host caller with no call waiting and below its share (an agent's calls always take turns).
Calls wait for a thread in a fair queue (bus/fair.py): round-robin over callers, each with
at most `limits.queued_per_caller` waiting and, for agents, at most
`limits.agent_running_per_caller` running (an inline call counts as running), so one
caller's flood delays only its own calls.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import socket
import threading
import time

import msgspec

from baaaht.bus import wire
from baaaht.bus.background import Background, Stopping, Task
from baaaht.bus.client import BusClient, client_settings
from baaaht.bus.connection import Connection
from baaaht.bus.curve import ClientCurve
from baaaht.bus.errors import BusError, exhausted, validation_error
from baaaht.bus.fair import FairQueue
from baaaht.bus.service import CallContext, Deferred, RpcSpec, Service, topic_matches
from baaaht.common.endpoints import Endpoints
from baaaht.schemas.base import Empty
from baaaht.schemas.bus import BusPing, Caller, Register, ServiceHealth
from baaaht.schemas.config import Config, LimitsConfig
from baaaht.schemas.errors import ErrorCode

log = logging.getLogger("baaaht.service")
_encode = msgspec.msgpack.Encoder().encode
_EMPTY = _encode(Empty())
STARTING = "starting"  # the health reason of an instance registered but not started yet
_DEFAULT_LIMITS = LimitsConfig()


def caller_key(caller: Caller) -> tuple[str, str]:
    """Whose turn a call waits for in the fair queue: an agent's container (all its connections
    together), else the connection the broker saw."""
    if caller.container:
        return (CONTAINER, caller.container)
    return (caller.socket, caller.peer)


ROUTED_WAIT = 1.0  # seconds a draining service waits for the broker's word that nothing more is on its way
CONTAINER = "container"
AGENT_KEYS = (CONTAINER, "agents")  # caller_key()[0] of an agent's call


class ServiceRunner:
    """Connects and registers a service of `service_type` at once (unhealthy, STARTING, so nothing
    is routed to it yet), offering `bus` for the service's publisher and peers; `run(service)` serves
    it. The order, on the way up and down:

        on_start -> healthy -> background work -> ... stop() ... -> unhealthy -> in-flight calls
        finish (up to the drain timeout) -> background work stops -> on_stop -> DISCONNECT (close)
    """

    def __init__(
        self,
        service_type: type[Service],
        endpoints: Endpoints,
        *,
        heartbeat_interval: float = 1.0,
        liveness: int = 3,
        drain_timeout: float = 10.0,
        queued_per_caller: int = _DEFAULT_LIMITS.queued_per_caller,
        agent_running_per_caller: int = _DEFAULT_LIMITS.agent_running_per_caller,
        curve: ClientCurve | None = None,
    ):
        self.service_type = service_type
        self.name = service_type.name
        self.rpcs = service_type.rpcs()
        self.decoders = {t: msgspec.msgpack.Decoder(spec.request_type) for t, spec in self.rpcs.items()}
        self.event_handlers = service_type.event_handlers()
        self.concurrency = service_type.concurrency
        self.drain_timeout = drain_timeout
        self.instance_id = f"{socket.gethostname()}-{os.getpid()}"
        self.agent_running_per_caller = min(agent_running_per_caller, self.concurrency)
        self.active: dict[bytes, CallContext] = {}
        self.queue: FairQueue[tuple[str, bytes, bytes, CallContext]] = FairQueue(queued_per_caller)
        self.handlers = [
            threading.Thread(target=self._handle_calls, name=f"{self.name}-rpc-{n}", daemon=True)
            for n in range(self.concurrency)
        ]
        for handler in self.handlers:
            handler.start()
        self.streaming: set[bytes] = set()  # tokens of the active calls that are streams
        self.deferred: dict[bytes, tuple[Deferred, CallContext]] = {}  # calls a Deferred answers later
        self.service: Service | None = None
        self.background: Background | None = None
        self.starting = True
        self.draining = False
        self.stopped = threading.Event()
        self._wake = threading.Event()
        self._reload_requested = False
        self._events_since: int | None = None  # where the event follower resumes
        self._events_epoch: int | None = None
        self.endpoints = endpoints
        self.connection = Connection(
            endpoints.services,
            heartbeat_interval=heartbeat_interval,
            liveness=liveness,
            on_message=self._on_message,
            registration=self._registration,
            health=self._health,
            curve=curve,
        )
        self.bus = BusClient(endpoints.services, events_endpoint=endpoints.events, connection=self.connection)

    @classmethod
    def for_config(cls, service_type: type[Service], config: Config) -> "ServiceRunner":
        endpoints, settings = Endpoints.for_config(config.bus), client_settings(config)
        if "curve" in settings:  # a service on another host, with a service key (docs/IDENTITY.md)
            endpoints = dataclasses.replace(
                endpoints, services=settings["endpoint"], events=settings["events_endpoint"]
            )
        return cls(
            service_type,
            endpoints,
            curve=settings.get("curve"),
            heartbeat_interval=float(config.bus.heartbeat_interval),
            liveness=config.bus.heartbeat_liveness,
            queued_per_caller=config.limits.queued_per_caller,
            agent_running_per_caller=config.limits.agent_running_per_caller,
        )

    # -- registration and health --------------------------------------------------------------

    def _registration(self) -> bytes:
        healthy, reason = self._health_state()
        return _encode(
            Register(
                service=self.name,
                instance=self.instance_id,
                methods=sorted(self.rpcs),
                schema_version=self.service_type.version,
                concurrency=self.concurrency,
                healthy=healthy,
                reason=reason,
            )
        )

    def _health_state(self) -> tuple[bool, str]:
        if self.draining:
            return False, "shutting down"
        if self.starting or self.service is None:
            return False, STARTING
        try:
            healthy, reason = self.service.health_report()
        except Exception as exc:  # a broken health check is itself a health problem
            healthy, reason = False, f"health check failed: {exc}"
        if self.background is not None:
            tasks_healthy, tasks_reason = self.background.health()
            healthy = healthy and tasks_healthy
            reason = "; ".join(part for part in (reason, tasks_reason) if part)
        return healthy, reason

    def _health(self) -> bytes:
        healthy, reason = self._health_state()
        return _encode(ServiceHealth(healthy=healthy, reason=reason))

    def _report_health(self) -> None:
        """Tell the broker now rather than at the next heartbeat."""
        self.connection.send(wire.pack(wire.HEARTBEAT, body=self._health()))

    # -- requests (called on the connection's I/O thread) -------------------------------------

    def _on_message(self, kind: bytes, envelope: bytes, extra: list[bytes]) -> None:
        header_bytes, body = wire.split(envelope)
        if kind == wire.CANCEL:
            context = self.active.get(body)
            if context is not None:
                context.cancelled.set()
            return
        route = extra[0]
        token, caller_bytes = route[: wire.TOKEN_SIZE], route[wire.TOKEN_SIZE :]
        header = wire.request_header.decode(header_bytes)
        context = CallContext(
            request_id=header.id,
            correlation_id=header.correlation,
            deadline=header.deadline,
            caller=wire.caller_body.decode(caller_bytes),
        )
        self.active[token] = context  # before it is queued: a handler thread may take it at once
        caller = caller_key(context.caller)
        agent = caller[0] in AGENT_KEYS
        share = self.agent_running_per_caller if agent else self.concurrency
        spec = self.rpcs.get(header.target)
        # An agent's calls always take turns in the fair queue: served here, they would go in the
        # order they reach the socket, and a flooding agent's would go ahead of everyone else's.
        if spec is not None and spec.inline and not agent and self.queue.start_now(caller, share):
            # Its turn and its share allow it now: served here, as a handler thread would, without the
            # hand-offs to one and back (a caller with calls waiting queues behind them instead).
            if self._serve(caller, header.target, body, token, context):
                self.queue.done(caller)
            return
        if not self.queue.put(caller, (header.target, body, token, context), share):
            del self.active[token]
            refused = exhausted(
                f"{header.target} refused: this caller already has {self.queue.per_caller} calls waiting"
                f" at service {self.name!r} (limits.queued_per_caller): wait for answers first",
                limit=self.queue.per_caller,
            )
            self._reply(wire.REPLY, context, _encode(refused.body()), token, refused.code.value)

    def _stop_handlers(self) -> None:
        """Let the handler threads finish the calls they run; the calls still queued are not served."""
        self.queue.close()
        for handler in self.handlers:
            handler.join()

    def _handle_calls(self) -> None:
        """A handler thread: serves whichever call the fair queue says is next, until it is closed."""
        while (taken := self.queue.take()) is not None:
            caller, call = taken
            spec = self.rpcs.get(call[0])
            streaming = spec is not None and spec.stream
            if streaming:
                # A stream had its turn, but holds no share while it runs: it mostly waits for what to
                # send, and its caller's other calls (a worker's heartbeats beside its task.work) must
                # not queue behind it.
                self.queue.done(caller)
            answered = True
            try:
                answered = self._serve(caller, *call)
            finally:
                if not streaming and answered:
                    self.queue.done(caller)

    def _serve(self, caller, target: str, body: bytes, token: bytes, context: CallContext) -> bool:
        """Serve one call; False when its handler returned a Deferred, which answers it later (and
        only then frees the caller's share and the call's place among the active ones)."""
        deferred = False
        try:
            spec = self.rpcs.get(target)
            if spec is None:
                raise BusError(ErrorCode.NOT_FOUND, f"service {self.name!r} has no method {target!r}")
            if self.service is None:  # routed before the start was reported: not ready to serve
                raise BusError(ErrorCode.UNAVAILABLE, f"service {self.name!r} is starting")
            context.check()
            try:
                request = self.decoders[target].decode(body)
            except (msgspec.DecodeError, RecursionError) as exc:  # RecursionError: nested too deep
                raise validation_error(target, exc) from None
            handler = getattr(self.service, spec.method)
            args = (request, context) if spec.wants_context else (request,)
            if spec.stream:
                self._serve_stream(spec, handler(*args), token, context)
            else:
                result = handler(*args)
                if isinstance(result, Deferred):
                    deferred = True
                    self.deferred[token] = (result, context)
                    result.on_settled(
                        lambda answer: self._answer_later(answer, caller, target, token, context)
                    )
                    return False
                self._reply(wire.REPLY, context, _EMPTY if result is None else _encode(result), token)
        except Exception as exc:
            self._reply_error(exc, target, token, context)
        finally:
            if not deferred:
                self.active.pop(token, None)
        return True

    def _answer_later(
        self, answer: Deferred, caller, target: str, token: bytes, context: CallContext
    ) -> None:
        """A Deferred's answer, on the thread that settled it."""
        try:
            if answer.error is not None:
                self._reply_error(answer.error, target, token, context)
            else:
                result = answer.result
                self._reply(wire.REPLY, context, _EMPTY if result is None else _encode(result), token)
        except Exception as exc:  # the result would not encode
            self._reply_error(exc, target, token, context)
        finally:
            self.deferred.pop(token, None)
            self.active.pop(token, None)
            self.queue.done(caller)

    def _expire_overdue(self) -> None:
        """Answer TIMEOUT for a Deferred still unsettled past its call's deadline (what should settle it
        failed): otherwise its caller's share and place among the active calls were held for ever."""
        for token, (answer, context) in list(self.deferred.items()):
            if context.remaining() <= 0 and answer.expire(
                BusError(ErrorCode.TIMEOUT, "the call was not answered by its deadline")
            ):
                log.error(
                    "a deferred answer was not settled by its call's deadline",
                    extra={"token": token.hex(), "correlation": context.correlation_id},
                )

    def _reply_error(self, exc: BaseException, target: str, token: bytes, context: CallContext) -> None:
        if not isinstance(exc, BusError):
            log.error(
                "handler failed",
                exc_info=exc,
                extra={"target": target, "correlation": context.correlation_id},
            )
            exc = BusError(ErrorCode.INTERNAL, f"{target} failed: {type(exc).__name__}: {exc}")
        self._reply(wire.REPLY, context, _encode(exc.body()), token, exc.code.value)

    def _serve_stream(self, spec: RpcSpec, items, token: bytes, context: CallContext) -> None:
        self.streaming.add(token)
        try:
            for item in items:
                if context.cancelled.is_set():
                    break
                self._reply(wire.PARTIAL, context, _encode(item), token)
        finally:
            self.streaming.discard(token)
            items.close()  # runs the handler's cleanup (finally blocks) on cancellation
        if context.cancelled.is_set():
            raise BusError(ErrorCode.CANCELLED, f"{spec.target} was cancelled by the caller")
        self._reply(wire.REPLY, context, _EMPTY, token)

    def _reply(self, kind: bytes, context: CallContext, body: bytes, token: bytes, error: str = "") -> None:
        self.connection.send(wire.reply(kind, context.request_id, body, error, token))

    # -- events -------------------------------------------------------------------------------

    def _event_prefixes(self) -> list[str]:
        patterns = [p for spec in self.event_handlers for p in spec.patterns]
        return [] if "*" in patterns else [p[:-1] if p.endswith(".*") else p for p in patterns]

    def _pin_events_start(self) -> None:
        """Where the event follower starts: the broker's "now" before this instance reports itself healthy.
        A caller that saw it healthy and then made an event (a user message that should start an
        assistant) has that event replayed to the follower, however late its subscription comes."""
        if not self.event_handlers or self._events_since is not None:
            return
        try:
            with self.bus.subscribe(self._event_prefixes()) as now:
                self._events_since, self._events_epoch = now.last_seq, now.epoch
        except BusError as exc:  # the broker is away: the follower starts from its own "now"
            log.warning("could not pin where events start", extra={"reason": exc.message})

    def _follow_events(self, stopping: Stopping) -> None:
        """Long-running background work of the runner: deliver subscribed events to the handlers."""
        prefixes = self._event_prefixes()
        decoders = {
            spec.method: msgspec.msgpack.Decoder(spec.event_type) if spec.event_type else None
            for spec in self.event_handlers
        }
        # From where _pin_events_start pinned it at first; after an interruption, from the last event seen.
        while not stopping.is_set():
            try:
                with self.bus.subscribe(
                    prefixes, since=self._events_since, epoch=self._events_epoch
                ) as subscription:
                    while not stopping.is_set():
                        delivery = subscription.next(timeout=0.2)
                        self._events_since, self._events_epoch = subscription.last_seq, subscription.epoch
                        if delivery is None:
                            continue
                        for spec in self.event_handlers:
                            if any(topic_matches(p, delivery.topic) for p in spec.patterns):
                                self._handle_event(spec.method, decoders[spec.method], delivery)
            except BusError as exc:  # the broker is away (not up yet, or restarting): subscribe again
                log.warning("event subscription interrupted", extra={"reason": exc.message})
                stopping.wait(self.connection.heartbeat_interval)

    def _handle_event(self, method: str, decoder, delivery) -> None:
        try:
            event = decoder.decode(delivery.body) if decoder else delivery
            getattr(self.service, method)(event)
        except msgspec.DecodeError:
            log.warning("undecodable event", extra={"topic": delivery.topic, "handler": method})
        except Exception:
            log.exception("event handler failed", extra={"topic": delivery.topic, "handler": method})

    # -- life cycle ---------------------------------------------------------------------------

    def run(self, service: Service) -> None:
        """Serve `service` until `stop()`; then finish in-flight work (up to the drain timeout) and leave."""
        if not isinstance(service, self.service_type):
            raise TypeError(f"a {self.service_type.__name__} runner cannot serve a {type(service).__name__}")
        events = [Task("events", self._follow_events)] if self.event_handlers else []
        self.background = Background.of_service(service, *events)
        self._await_registration()
        try:
            service.on_start()
        except BaseException:
            self.close()
            raise
        self.service = service
        self.starting = False
        self._pin_events_start()
        self._report_health()
        self.background.start()
        log.info("serving", extra={"service": self.name, "methods": sorted(self.rpcs)})
        self._serve_until_stopped()
        self.draining = True
        self._report_health()  # unhealthy from now on: the broker routes nothing new here
        self._await_routed()
        for token in list(self.streaming):  # a stream (a follow, a worker's task.work) never ends by itself
            if (context := self.active.get(token)) is not None:
                context.cancelled.set()
        deadline = time.monotonic() + self.drain_timeout
        while self.active and time.monotonic() < deadline:
            self._expire_overdue()
            time.sleep(0.05)
        for context in list(self.active.values()):  # handlers still finishing remove themselves
            context.cancelled.set()
        self._stop_handlers()
        self.background.stop()
        # on_stop while still registered (unhealthy): after a DISCONNECT the next health heartbeat
        # would have the broker ask us to register again. close() sends the one DISCONNECT.
        service.on_stop()
        self.connection.close()
        log.info("stopped", extra={"service": self.name})
        if self.connection.refused is not None:
            raise self._refusal()

    def _await_registration(self) -> None:
        """Registered as STARTING before `on_start`: the broker handles one connection's messages in
        order, so its answer to a BusPing sent after our REGISTER means it has the REGISTER. A broker not
        up yet is waited for no longer than the silence limit: it gets the REGISTER when it comes."""
        limit = self.connection.core.silence_limit
        if not self.connection.wait_connected(limit):
            log.warning("starting before the broker is up", extra={"endpoint": self.endpoints.services})
            return
        try:
            self.bus.call(BusPing(), timeout=limit)
        except BusError as exc:
            log.warning("starting before the broker confirmed registration", extra={"reason": exc.message})
        if self.connection.refused is not None:  # the refusal arrives before the Pong: do not start
            self.close()
            raise self._refusal()

    def _await_routed(self) -> None:
        """Once unhealthy, wait for what the broker routed here before it knew: a request on its way
        when the stop came is not in `active` yet, and would be dropped unanswered by the drain. The
        broker handles one connection's messages in order, so its answer to a BusPing sent after the
        unhealthy heartbeat comes behind every request it routed here before it."""
        if not self.connection.core.connected:  # the broker is away (stopping too): nothing is on its way
            return
        try:  # a broker answers a ping within milliseconds; one lost meanwhile fails it at once
            self.bus.call(BusPing(), timeout=min(ROUTED_WAIT, self.connection.core.silence_limit))
        except BusError as exc:
            log.warning("draining without the broker's word", extra={"reason": exc.message})

    def _refusal(self) -> SystemExit:
        return SystemExit(f"{self.name}: registration refused: {self.connection.refused.message}")

    def _serve_until_stopped(self) -> None:
        while not self.stopped.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            self._expire_overdue()
            if self._reload_requested and not self.stopped.is_set():
                self._reload_requested = False
                self._reload()
            if self.connection.refused is not None:
                self.stop()  # a refused registration will not succeed by retrying: leave, non-zero

    def _reload(self) -> None:
        log.info("reloading", extra={"service": self.name})
        try:
            self.service.on_reload()
        except Exception:
            log.exception("reload failed", extra={"service": self.name})

    def stop(self, *_signal) -> None:
        self.stopped.set()
        self._wake.set()

    def request_reload(self, *_signal) -> None:
        """Run the service's `on_reload` on the runner's thread (not inside a signal handler)."""
        self._reload_requested = True
        self._wake.set()

    def close(self) -> None:
        """Leave without having served (the service could not be built or started)."""
        self.connection.close()  # sends the DISCONNECT
        self.queue.close()

    def handle_signals(self) -> None:
        """SIGTERM and SIGINT stop the service, SIGHUP reloads it. Call from the main thread."""
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        signal.signal(signal.SIGHUP, self.request_reload)


def main(service_type: type[Service], argv: list[str] | None = None) -> None:
    """Entry point of a service process: `python -m baaaht.services.NAME --config FILE`. The service
    is built by its `from_config(config, bus)` with the runner's bus for its publisher and peers."""
    from baaaht.common.config import load_config
    from baaaht.common.logs import setup_logging

    parser = argparse.ArgumentParser(description=f"Run the baaaht {service_type.name} service.")
    parser.add_argument("--config", default=os.environ.get("BAAAHT_CONFIG"))
    args = parser.parse_args(argv)
    config, _sources = load_config(args.config)
    setup_logging(config.log, service_type.name)
    runner = ServiceRunner.for_config(service_type, config)
    runner.handle_signals()
    try:
        service = service_type.from_config(config, runner.bus)
    except BaseException:
        runner.close()
        raise
    runner.run(service)
