"""Runs a Service on the bus: registration, decoding, bounded concurrency,
streaming, cancellation, event handlers and graceful shutdown.

Handlers run on a thread pool rather than an event loop: the docker SDK,
sqlite3 and file I/O all block, and a pool bounds how many run at once (the
`concurrency` the service registers with). The connection's I/O thread never
runs handler code.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import logging
import os
import signal
import socket
import threading
import time
from typing import Callable

import msgspec

from baaaht.bus import wire
from baaaht.bus.client import BusClient
from baaaht.bus.connection import Connection
from baaaht.bus.errors import BusError, validation_error
from baaaht.bus.service import CallContext, RpcSpec, Service, topic_matches
from baaaht.common.endpoints import Endpoints
from baaaht.schemas.base import Empty
from baaaht.schemas.bus import HealthReport, Register
from baaaht.schemas.config import Config
from baaaht.schemas.errors import ErrorCode

log = logging.getLogger("baaaht.service")
_encode = msgspec.msgpack.Encoder().encode
_EMPTY = _encode(Empty())


class ServiceRunner:
    def __init__(
        self,
        service: Service,
        endpoints: Endpoints,
        *,
        concurrency: int = 8,
        heartbeat_interval: float = 1.0,
        liveness: int = 3,
        drain_timeout: float = 10.0,
    ):
        self.service = service
        self.rpcs = type(service).rpcs()
        self.decoders = {t: msgspec.msgpack.Decoder(spec.request_type) for t, spec in self.rpcs.items()}
        self.event_handlers = type(service).event_handlers()
        self.concurrency = concurrency
        self.drain_timeout = drain_timeout
        self.instance_id = f"{socket.gethostname()}-{os.getpid()}"
        self.pool = concurrent.futures.ThreadPoolExecutor(
            concurrency, thread_name_prefix=f"{service.name}-rpc"
        )
        self.active: dict[bytes, CallContext] = {}
        self.draining = False
        self.stopped = threading.Event()
        self.endpoints = endpoints
        self.connection = Connection(
            endpoints.services,
            heartbeat_interval=heartbeat_interval,
            liveness=liveness,
            on_message=self._on_message,
            registration=self._registration,
            health=self._health,
        )
        self.client = BusClient(
            endpoints.services, events_endpoint=endpoints.events, connection=self.connection
        )
        service.bus = self.client

    @classmethod
    def for_config(cls, service: Service, config: Config) -> "ServiceRunner":
        return cls(
            service,
            Endpoints.for_config(config.bus),
            concurrency=service.concurrency,
            heartbeat_interval=float(config.bus.heartbeat_interval),
            liveness=config.bus.heartbeat_liveness,
        )

    # -- registration and health --------------------------------------------------------------

    def _registration(self) -> bytes:
        healthy, reason = self._health_state()
        return _encode(
            Register(
                service=self.service.name,
                instance=self.instance_id,
                methods=sorted(self.rpcs),
                schema_version=self.service.version,
                concurrency=self.concurrency,
                healthy=healthy,
                reason=reason,
            )
        )

    def _health_state(self) -> tuple[bool, str]:
        if self.draining:
            return False, "shutting down"
        try:
            return self.service.health()
        except Exception as exc:  # a broken health check is itself a health problem
            return False, f"health check failed: {exc}"

    def _health(self) -> bytes:
        healthy, reason = self._health_state()
        return _encode(HealthReport(healthy=healthy, reason=reason))

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
        self.active[token] = context
        self.pool.submit(self._serve, header.target, body, token, context)

    def _serve(self, target: str, body: bytes, token: bytes, context: CallContext) -> None:
        try:
            spec = self.rpcs.get(target)
            if spec is None:
                raise BusError(ErrorCode.NOT_FOUND, f"service {self.service.name!r} has no method {target!r}")
            context.check()
            try:
                request = self.decoders[target].decode(body)
            except msgspec.DecodeError as exc:
                raise validation_error(target, exc) from None
            handler = getattr(self.service, spec.method)
            args = (request, context) if spec.wants_context else (request,)
            if spec.stream:
                self._serve_stream(spec, handler(*args), token, context)
            else:
                result = handler(*args)
                self._reply(wire.REPLY, context, _EMPTY if result is None else _encode(result), token)
        except BusError as exc:
            self._reply(wire.REPLY, context, _encode(exc.body()), token, exc.code.value)
        except Exception as exc:
            log.exception("handler failed", extra={"target": target, "correlation": context.correlation_id})
            error = BusError(ErrorCode.INTERNAL, f"{target} failed: {type(exc).__name__}: {exc}")
            self._reply(wire.REPLY, context, _encode(error.body()), token, error.code.value)
        finally:
            self.active.pop(token, None)

    def _serve_stream(self, spec: RpcSpec, items, token: bytes, context: CallContext) -> None:
        try:
            for item in items:
                if context.cancelled.is_set():
                    break
                self._reply(wire.PARTIAL, context, _encode(item), token)
        finally:
            items.close()  # runs the handler's cleanup (finally blocks) on cancellation
        if context.cancelled.is_set():
            raise BusError(ErrorCode.CANCELLED, f"{spec.target} was cancelled by the caller")
        self._reply(wire.REPLY, context, _EMPTY, token)

    def _reply(self, kind: bytes, context: CallContext, body: bytes, token: bytes, error: str = "") -> None:
        self.connection.send([wire.reply(kind, context.request_id, body, error, token)])

    # -- events -------------------------------------------------------------------------------

    def _follow_events(self) -> None:
        patterns = [p for spec in self.event_handlers for p in spec.patterns]
        prefixes = [] if "*" in patterns else [p[:-1] if p.endswith(".*") else p for p in patterns]
        decoders = {
            spec.method: msgspec.msgpack.Decoder(spec.event_type) if spec.event_type else None
            for spec in self.event_handlers
        }
        since = epoch = None  # from the broker's "now" at first; after a failure, from the last seen
        while not self.stopped.is_set():
            try:
                with self.client.subscribe(prefixes, since=since, epoch=epoch) as subscription:
                    while not self.stopped.is_set():
                        delivery = subscription.next(timeout=0.2)
                        since, epoch = subscription.last_seq, subscription.epoch
                        if delivery is None:
                            continue
                        for spec in self.event_handlers:
                            if any(topic_matches(p, delivery.topic) for p in spec.patterns):
                                self._handle_event(spec.method, decoders[spec.method], delivery)
            except BusError as exc:  # the broker is away (not up yet, or restarting): subscribe again
                log.warning("event subscription interrupted", extra={"reason": exc.message})
                self.stopped.wait(self.connection.heartbeat_interval)

    def _handle_event(self, method: str, decoder, delivery) -> None:
        try:
            event = decoder.decode(delivery.body) if decoder else delivery
            getattr(self.service, method)(event)
        except msgspec.DecodeError:
            log.warning("undecodable event", extra={"topic": delivery.topic, "handler": method})
        except Exception:
            log.exception("event handler failed", extra={"topic": delivery.topic, "handler": method})

    # -- life cycle ---------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until `stop()`; then finish in-flight work (up to the drain timeout) and leave."""
        self.service.start()
        events = None
        if self.event_handlers:
            events = threading.Thread(
                target=self._follow_events, name=f"{self.service.name}-events", daemon=True
            )
            events.start()
        log.info("serving", extra={"service": self.service.name, "methods": sorted(self.rpcs)})
        while not self.stopped.wait(1.0):
            if self.connection.refused is not None:
                self.stop()  # a refused registration will not succeed by retrying: leave, non-zero
        self.draining = True
        # Unhealthy from now on: the broker routes nothing new here.
        self.connection.send([wire.pack(wire.HEARTBEAT, body=self._health())])
        deadline = time.monotonic() + self.drain_timeout
        while self.active and time.monotonic() < deadline:
            time.sleep(0.05)
        for context in list(self.active.values()):  # handlers still finishing remove themselves
            context.cancelled.set()
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.connection.send([wire.pack(wire.DISCONNECT)])
        if events is not None:
            events.join(2.0)
        self.service.stop()
        self.connection.close()
        log.info("stopped", extra={"service": self.service.name})
        if self.connection.refused is not None:
            raise SystemExit(f"{self.service.name}: registration refused: {self.connection.refused.message}")

    def stop(self, *_args) -> None:
        self.stopped.set()


def main(build: Callable[[Config], Service], argv: list[str] | None = None) -> None:
    """Entry point of a service process: `python -m baaaht.services.NAME --config FILE`."""
    from baaaht.common.config import load_config
    from baaaht.common.logs import setup_logging

    parser = argparse.ArgumentParser(description="Run a baaaht bus service.")
    parser.add_argument("--config", default=os.environ.get("BAAAHT_CONFIG"))
    args = parser.parse_args(argv)
    config, _sources = load_config(args.config)
    service = build(config)
    setup_logging(config.log, service.name)
    runner = ServiceRunner.for_config(service, config)
    signal.signal(signal.SIGTERM, runner.stop)
    signal.signal(signal.SIGINT, runner.stop)
    runner.run()
