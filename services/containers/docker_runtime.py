"""The Docker runtime: the Runtime protocol over the docker SDK's low-level API client.

Short calls carry `runtime.timeout` as their HTTP timeout. Long calls (wait, logs, stats stream, pull,
events) have no client-side limit at all: they return an EngineStream that the service closes when the
caller cancels or its deadline passes, so a wait lasts exactly as long as the caller wants.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
import struct
import threading
from functools import partial
from typing import Any, Callable, Generic, Iterable, Iterator, TypeVar
from urllib.parse import urlparse

import docker
import requests
import urllib3

from baaaht.bus.errors import BusError
from baaaht.schemas.config import Config, DockerConfig
from baaaht.schemas.containers import (
    ContainerInfo,
    ContainerLogs,
    ContainerSpec,
    ContainerSummary,
    HealthReport,
    ImageStatus,
    LogLine,
    PullProgress,
    StatsSample,
    WaitResult,
)
from baaaht.schemas.errors import ErrorCode
from baaaht.services.containers.hardening import LABEL_ROLE, LABEL_SESSION
from baaaht.services.containers.runtime import EngineEvent, RuntimeConfigError

log = logging.getLogger(__name__)

T = TypeVar("T")
NANO = 1_000_000_000
ZERO_TIME = "0001-01-01T00:00:00Z"
# Streams (waits, log followers, event feed) each hold a connection: the pool must not be the limit.
MAX_POOL_SIZE = 128
# Engine messages that mean "not in the state this operation needs", which Docker sends as 500 or 409.
STATE_CONFLICTS = ("is not running", "is not paused", "is already paused", "is paused", "is restarting")


# -- configuration ----------------------------------------------------------------------------------


def tls_config(cfg: DockerConfig) -> docker.tls.TLSConfig | bool:
    """TLS settings for `docker.host`. Unix sockets use none. Over TCP, certificates are always verified
    (against `tls_ca_cert`, else the system's CAs); `tls_verify=false` means plain TCP, never TLS
    without verification."""
    scheme = urlparse(cfg.host).scheme
    has_files = bool(cfg.tls_ca_cert or cfg.tls_cert or cfg.tls_key)
    if scheme not in ("tcp", "https"):
        if has_files:
            raise RuntimeConfigError(f"docker.tls_* options need a tcp:// docker.host, not {cfg.host!r}")
        return False
    if not cfg.tls_verify:
        if has_files:
            raise RuntimeConfigError(
                "docker.tls_verify=false together with TLS files would skip certificate verification, "
                "which baaaht does not do; set tls_verify=true (and tls_ca_cert for a private CA)"
            )
        log.warning("docker.host %s without TLS: the engine API travels unencrypted", cfg.host)
        return False
    if bool(cfg.tls_cert) != bool(cfg.tls_key):
        raise RuntimeConfigError("docker.tls_cert and docker.tls_key must be given together")
    try:
        return docker.tls.TLSConfig(
            client_cert=(cfg.tls_cert, cfg.tls_key) if cfg.tls_cert else None,
            ca_cert=cfg.tls_ca_cert or None,
            verify=cfg.tls_ca_cert or True,
        )
    except docker.errors.TLSParameterError as exc:
        raise RuntimeConfigError(f"docker TLS configuration: {exc}") from None


def create_args(spec: ContainerSpec, api_version: str) -> dict[str, Any]:
    """`APIClient.create_container` keyword arguments for exactly this spec (no defaults added here)."""
    network_mode = spec.network_mode or (spec.networks[0] if spec.networks else "")
    resources = spec.resources
    restart = None
    if spec.restart_policy != "no":
        restart = {"Name": spec.restart_policy, "MaximumRetryCount": spec.restart_max_retries}
    host_config = docker.types.HostConfig(
        version=api_version,
        mounts=[
            docker.types.Mount(
                target=m.target,
                source=m.source or None,
                type=m.type,
                read_only=m.read_only,
                tmpfs_size=m.tmpfs_size or None,
            )
            for m in spec.mounts
        ],
        port_bindings={
            f"{p.container_port}/{p.protocol}": (p.host_ip, p.host_port or None) for p in spec.ports
        },
        network_mode=network_mode or None,
        nano_cpus=int(resources.cpus * NANO) or None,
        mem_limit=resources.memory or None,
        memswap_limit=resources.memory_swap or None,
        # Carried on its own: a pids limit never depends on another limit being set.
        pids_limit=resources.pids or None,
        restart_policy=restart,
        auto_remove=spec.remove_on_stop,
        read_only=spec.read_only_rootfs or None,
        group_add=spec.group_add or None,
        cap_add=spec.cap_add or None,
        cap_drop=spec.cap_drop or None,
        security_opt=spec.security_opt or None,
        privileged=spec.privileged,
        init=spec.init,
    )
    healthcheck = None
    if spec.healthcheck is not None:
        check = spec.healthcheck
        healthcheck = docker.types.Healthcheck(
            test=check.test,
            interval=int(check.interval * NANO),
            timeout=int(check.timeout * NANO),
            retries=check.retries,
            start_period=int(check.start_period * NANO),
        )
    return dict(
        image=spec.image,
        command=[*spec.command, *spec.args] or None,
        entrypoint=spec.entrypoint,
        environment=[f"{k}={v}" for k, v in spec.env.items()] or None,
        labels=dict(spec.labels),
        working_dir=spec.working_dir or None,
        user=spec.user or None,
        name=spec.name or None,
        ports=[(p.container_port, p.protocol) for p in spec.ports] or None,
        host_config=host_config,
        healthcheck=healthcheck,
        stdin_open=False,
        tty=False,
        detach=True,
    )


# -- engine answers -> schema types (pure) ----------------------------------------------------------


def _time_or_empty(value: str | None) -> str:
    return "" if not value or value.startswith("0001-") else value


def container_info(raw: dict) -> ContainerInfo:
    state = raw.get("State") or {}
    labels = (raw.get("Config") or {}).get("Labels") or {}
    status = state.get("Status", "unknown")
    health = state.get("Health")
    return ContainerInfo(
        id=raw["Id"],
        name=raw.get("Name", "").lstrip("/"),
        image=(raw.get("Config") or {}).get("Image", ""),
        state=status,
        session_id=labels.get(LABEL_SESSION, ""),
        role=labels.get(LABEL_ROLE, ""),
        labels=labels,
        created=raw.get("Created", ""),
        started_at=_time_or_empty(state.get("StartedAt")),
        finished_at=_time_or_empty(state.get("FinishedAt")),
        exit_code=state.get("ExitCode") if status in ("exited", "dead") else None,
        oom_killed=bool(state.get("OOMKilled")),
        error=state.get("Error", ""),
        health=health.get("Status") if health else None,
        pid=state.get("Pid", 0),
        restart_count=raw.get("RestartCount", 0),
    )


def container_summary(row: dict) -> ContainerSummary:
    labels = row.get("Labels") or {}
    names = row.get("Names") or [""]
    return ContainerSummary(
        id=row["Id"],
        name=names[0].lstrip("/"),
        image=row.get("Image", ""),
        state=row.get("State", "unknown"),
        status=row.get("Status", ""),
        session_id=labels.get(LABEL_SESSION, ""),
        role=labels.get(LABEL_ROLE, ""),
        created=float(row.get("Created", 0)),
        labels=labels,
    )


def health_report(raw: dict) -> HealthReport:
    """Engine health when the container has a healthcheck; otherwise derived from its state.
    A stopped container cannot become healthy, so it reports `unhealthy` whatever its last check said."""
    state = raw.get("State") or {}
    status = state.get("Status", "unknown")
    health = state.get("Health")
    stopped = status in ("exited", "dead")
    if health:
        checks = health.get("Log") or []
        return HealthReport(
            status="unhealthy" if stopped else health.get("Status", "unknown"),
            has_healthcheck=True,
            failing_streak=health.get("FailingStreak", 0),
            last_output=(checks[-1].get("Output") or "").strip() if checks else "",
            state=status,
        )
    if status == "running":
        derived = "healthy"
    elif stopped and (state.get("OOMKilled") or state.get("ExitCode", 0) != 0):
        derived = "unhealthy"
    else:
        derived = "unknown"
    return HealthReport(status=derived, has_healthcheck=False, state=status)


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


def engine_event(raw: dict) -> EngineEvent:
    actor = raw.get("Actor") or {}
    when = raw.get("timeNano")
    return EngineEvent(
        kind=raw.get("Type", ""),
        action=raw.get("Action", ""),
        id=actor.get("ID", raw.get("id", "")),
        time=when / NANO if when else float(raw.get("time", 0)),
        attributes=dict(actor.get("Attributes") or {}),
    )


def pull_progress(raw: dict) -> PullProgress:
    detail = raw.get("progressDetail") or {}
    return PullProgress(
        status=raw.get("status", ""),
        layer=raw.get("id", ""),
        current=detail.get("current", 0),
        total=detail.get("total", 0),
    )


class LogDemuxer:
    """Turns Docker's multiplexed log frames (8-byte header: stream, 0, 0, 0, big-endian length) into
    lines. A line may span frames; each stream keeps its own unfinished line until it is completed."""

    STREAMS = {1: "stdout", 2: "stderr"}

    def __init__(self, timestamps: bool):
        self.timestamps = timestamps
        self.partial: dict[str, bytes] = {"stdout": b"", "stderr": b""}

    def feed(self, stream: str, data: bytes) -> list[LogLine]:
        *complete, rest = (self.partial[stream] + data).split(b"\n")
        self.partial[stream] = rest
        return [self._line(stream, raw) for raw in complete]

    def flush(self) -> list[LogLine]:
        lines = [self._line(stream, rest) for stream, rest in self.partial.items() if rest]
        self.partial = {"stdout": b"", "stderr": b""}
        return lines

    def _line(self, stream: str, raw: bytes) -> LogLine:
        text = raw.decode("utf-8", errors="replace")
        if self.timestamps:
            stamp, _, text = text.partition(" ")
            return LogLine(stream=stream, text=text, time=stamp)
        return LogLine(stream=stream, text=text)


def read_exact(read: Callable[[int], bytes], size: int) -> bytes:
    """`size` bytes, or fewer only at the end of the stream (a raw socket read may return less)."""
    chunks, missing = [], size
    while missing:
        chunk = read(missing)
        if not chunk:
            break
        chunks.append(chunk)
        missing -= len(chunk)
    return b"".join(chunks)


def demux_frames(read: Callable[[int], bytes]) -> Iterator[tuple[str, bytes]]:
    while True:
        header = read_exact(read, 8)
        if len(header) < 8:
            return
        stream_id, length = struct.unpack(">BxxxL", header)
        data = read_exact(read, length)
        yield LogDemuxer.STREAMS.get(stream_id, "stdout"), data
        if len(data) < length:
            return


# -- errors -----------------------------------------------------------------------------------------


class EngineErrors:
    """Translates docker SDK and transport exceptions into BusErrors with the fitting code."""

    def __init__(self, host: str, timeout: float):
        self.host = host
        self.timeout = timeout

    @contextlib.contextmanager
    def translate(self, operation: str, target: str = ""):
        subject = f"{operation} {target}".strip()
        try:
            yield
        except BusError:
            raise
        except docker.errors.NotFound as exc:
            raise BusError(ErrorCode.NOT_FOUND, f"{subject}: {exc.explanation}", {"target": target}) from None
        except docker.errors.APIError as exc:
            raise self._api_error(operation, subject, target, exc) from None
        except requests.exceptions.ConnectTimeout as exc:
            raise self.unreachable(exc) from None
        except requests.exceptions.ReadTimeout:
            raise BusError(
                ErrorCode.TIMEOUT,
                f"{subject}: the docker engine at {self.host} did not answer within {self.timeout:g}s",
            ) from None
        except (requests.exceptions.ConnectionError, urllib3.exceptions.HTTPError, OSError) as exc:
            raise self.unreachable(exc) from None
        except docker.errors.DockerException as exc:
            raise self.unreachable(exc) from None

    def unreachable(self, exc: BaseException) -> BusError:
        return BusError(
            ErrorCode.UNAVAILABLE,
            f"the docker engine at {self.host} is unreachable: {exc}",
            {"host": self.host},
        )

    @staticmethod
    def _api_error(operation: str, subject: str, target: str, exc: docker.errors.APIError) -> BusError:
        explanation = str(exc.explanation or exc)
        status = exc.status_code or 500
        details = {"target": target, "engine_status": status}
        if status == 409 and operation == "create":
            return BusError(ErrorCode.ALREADY_EXISTS, f"{subject}: {explanation}", details)
        if status == 409 or any(marker in explanation for marker in STATE_CONFLICTS):
            return BusError(ErrorCode.FAILED_PRECONDITION, f"{subject}: {explanation}", details)
        if status == 400:
            return BusError(ErrorCode.INVALID_ARGUMENT, f"{subject}: {explanation}", details)
        return BusError(
            ErrorCode.INTERNAL, f"{subject}: docker engine error {status}: {explanation}", details
        )


class EngineStream(Generic[T]):
    """Items read from one streaming engine response. `close()` (any thread) shuts its socket, which ends
    the iteration quietly; a connection lost otherwise raises UNAVAILABLE."""

    def __init__(self, response: requests.Response, items: Iterable[T], errors: EngineErrors, what: str):
        self._response = response
        self._items = items
        self._errors = errors
        self._what = what
        self._closed = threading.Event()
        self._reading = False

    def __iter__(self) -> Iterator[T]:
        self._reading = True
        try:
            yield from self._items
        except (OSError, urllib3.exceptions.HTTPError, requests.exceptions.RequestException) as exc:
            if not self._closed.is_set():
                raise BusError(
                    ErrorCode.UNAVAILABLE, f"{self._what}: the engine connection broke: {exc}"
                ) from None
        finally:
            self._closed.set()
            self._response.close()

    def close(self) -> None:
        """Safe from any thread: it only shuts the socket down; the reading thread, seeing the end of
        the data, closes the response itself (closing it here would race with that read)."""
        if self._closed.is_set():
            return
        self._closed.set()
        shutdown_socket(self._response)
        if not self._reading:
            self._response.close()


def shutdown_socket(response: requests.Response) -> None:
    # Where the socket sits under requests/urllib3/http.client, as docker's CancellableStream finds it.
    try:
        fp = response.raw._fp.fp
        raw = fp.raw
        sock = getattr(raw, "_sock", None) or getattr(raw, "sock", None)
        if hasattr(sock, "socket"):  # pyopenssl wrapper
            sock = sock.socket
        sock.shutdown(socket.SHUT_RDWR)
    except (AttributeError, OSError):
        pass  # already closed: nothing left to interrupt


# -- the runtime ------------------------------------------------------------------------------------


class DockerRuntime:
    name = "docker"

    def __init__(self, config: Config):
        self.host = config.docker.host
        self.timeout = float(config.runtime.timeout)
        self._tls = tls_config(config.docker)
        self._errors = EngineErrors(self.host, self.timeout)
        self._client: docker.APIClient | None = None
        self._socket_path = urlparse(self.host).path if self.host.startswith("unix://") else ""
        self._connect_lock = threading.Lock()

    # The client is made on first use, not here: a service must start (and report itself unhealthy)
    # while the engine is down, and connect once it answers.
    def _api(self) -> docker.APIClient:
        # A missing socket file is the common "engine down" case: say so plainly (and do not make the
        # SDK open a socket that it then leaks when the connect fails).
        if self._socket_path and not os.path.exists(self._socket_path):
            raise self._errors.unreachable(FileNotFoundError(f"{self._socket_path} does not exist"))
        client = self._client
        if client is not None:
            return client
        with self._connect_lock:
            if self._client is None:
                with self._errors.translate("connect"):
                    self._client = docker.APIClient(
                        base_url=self.host,
                        version="auto",
                        timeout=self.timeout,
                        tls=self._tls,
                        max_pool_size=MAX_POOL_SIZE,
                    )
            return self._client

    def _call(self, operation: str, target: str, fn: Callable[[docker.APIClient], T]) -> T:
        with self._errors.translate(operation, target):
            return fn(self._api())

    def _open_stream(
        self, operation: str, target: str, method: str, path: str, params: dict, parse
    ) -> EngineStream:
        """A streaming request with no read timeout: the caller's deadline ends it, via close()."""
        api = self._api()
        with self._errors.translate(operation, target):
            send = api._post if method == "post" else api._get
            response = send(
                api._url(path, target) if target else api._url(path), params=params, stream=True, timeout=None
            )
            api._raise_for_status(response)
        return EngineStream(response, parse(api, response), self._errors, f"{operation} {target}".strip())

    # -- Runtime protocol -------------------------------------------------------------------------

    def ping(self) -> str:
        version = self._call("ping", "", lambda api: api.version(api_version=False))
        return f"docker {version.get('Version', '?')} (API {version.get('ApiVersion', '?')}) at {self.host}"

    def create(self, spec: ContainerSpec) -> tuple[str, list[str]]:
        api = self._api()
        extra_networks = spec.networks[1:] if spec.network_mode == "" else spec.networks
        created = self._call(
            "create", spec.name, lambda api: api.create_container(**create_args(spec, api._version))
        )
        container = created["Id"]
        for network in extra_networks:
            try:
                self._call(
                    "connect network", network, partial(_connect, container=container, network=network)
                )
            except BusError:
                # A half-made container must not stay behind.
                with contextlib.suppress(Exception):
                    api.remove_container(container, force=True)
                raise
        return container, list(created.get("Warnings") or [])

    def start(self, container: str) -> None:
        self._call("start", container, lambda api: api.start(container))

    def stop(self, container: str, timeout: float) -> None:
        # The SDK adds the stop timeout to the HTTP timeout, so a slow stop is not cut short.
        self._call("stop", container, lambda api: api.stop(container, timeout=int(round(timeout))))

    def restart(self, container: str, timeout: float) -> None:
        self._call("restart", container, lambda api: api.restart(container, timeout=int(round(timeout))))

    def kill(self, container: str, signal: str) -> None:
        self._call("kill", container, lambda api: api.kill(container, signal=signal))

    def pause(self, container: str) -> None:
        self._call("pause", container, lambda api: api.pause(container))

    def unpause(self, container: str) -> None:
        self._call("unpause", container, lambda api: api.unpause(container))

    def remove(self, container: str, force: bool, volumes: bool) -> None:
        self._call("remove", container, lambda api: api.remove_container(container, v=volumes, force=force))

    def wait(self, container: str) -> EngineStream[WaitResult]:
        def parse(api, response) -> Iterator[WaitResult]:
            body = api._result(response, json=True)
            error = (body.get("Error") or {}).get("Message", "")
            yield WaitResult(exit_code=body.get("StatusCode", -1), error=error)

        return self._open_stream(
            "wait", container, "post", "/containers/{0}/wait", {"condition": "not-running"}, parse
        )

    def inspect(self, container: str) -> ContainerInfo:
        return container_info(self._call("inspect", container, lambda api: api.inspect_container(container)))

    def health(self, container: str) -> HealthReport:
        return health_report(self._call("health", container, lambda api: api.inspect_container(container)))

    def list(self, labels: dict[str, str]) -> list[ContainerSummary]:
        filters = {"label": [f"{key}={value}" for key, value in labels.items()]}
        rows = self._call("list", "", lambda api: api.containers(all=True, filters=filters))
        return [container_summary(row) for row in rows]

    def logs(self, container: str, options: ContainerLogs) -> EngineStream[LogLine]:
        tty = self._call("logs", container, lambda api: api.inspect_container(container))["Config"].get("Tty")
        params: dict[str, Any] = {
            "stdout": int(options.stdout),
            "stderr": int(options.stderr),
            "timestamps": int(options.timestamps),
            "follow": int(options.follow),
            "tail": "all" if options.tail < 0 else str(options.tail),
        }
        if options.since:
            params["since"] = options.since
        if options.until:
            params["until"] = options.until

        def parse(api, response) -> Iterator[LogLine]:
            demuxer = LogDemuxer(options.timestamps)
            read = response.raw.read
            # A TTY container's log is one raw stream; otherwise frames say stdout or stderr.
            frames = (
                (("stdout", chunk) for chunk in iter(lambda: read(4096), b"")) if tty else demux_frames(read)
            )
            for stream, data in frames:
                yield from demuxer.feed(stream, data)
            yield from demuxer.flush()

        return self._open_stream("logs", container, "get", "/containers/{0}/logs", params, parse)

    def stats(self, container: str) -> StatsSample:
        raw = self._call("stats", container, lambda api: api.stats(container, stream=False))
        return stats_sample(raw, datetime.datetime.now().timestamp())

    def stats_stream(self, container: str) -> EngineStream[StatsSample]:
        def parse(api, response) -> Iterator[StatsSample]:
            for raw in api._stream_helper(response, decode=True):
                if not sample_is_live(raw):
                    return
                yield stats_sample(raw, datetime.datetime.now().timestamp())

        return self._open_stream("stats", container, "get", "/containers/{0}/stats", {"stream": 1}, parse)

    def image_exists(self, image: str) -> ImageStatus:
        try:
            found = self._call("image inspect", image, lambda api: api.inspect_image(image))
        except BusError as exc:
            if exc.code is ErrorCode.NOT_FOUND:
                return ImageStatus(exists=False)
            raise
        return ImageStatus(exists=True, id=found.get("Id", ""))

    def pull(self, image: str) -> EngineStream[PullProgress]:
        repository, tag = docker.utils.parse_repository_tag(image)

        def parse(api, response) -> Iterator[PullProgress]:
            for raw in api._stream_helper(response, decode=True):
                if raw.get("error"):
                    raise BusError(ErrorCode.UNAVAILABLE, f"pull {image}: {raw['error']}", {"image": image})
                yield pull_progress(raw)

        params = {"fromImage": repository, "tag": tag or "latest"}
        try:
            return self._open_stream("pull", image, "post", "/images/create", params, parse)
        except BusError as exc:
            # The engine answers 500 for any registry trouble: for the caller the image is unavailable.
            if exc.code is ErrorCode.INTERNAL:
                raise BusError(ErrorCode.UNAVAILABLE, exc.message, exc.details) from None
            raise

    def events(self, since: float) -> EngineStream[EngineEvent]:
        params = {"filters": docker.utils.convert_filters({"type": ["container", "image"]})}
        if since:
            params["since"] = f"{since:.9f}"

        def parse(api, response) -> Iterator[EngineEvent]:
            for raw in api._stream_helper(response, decode=True):
                yield engine_event(raw)

        return self._open_stream("events", "", "get", "/events", params, parse)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def _connect(api: docker.APIClient, container: str, network: str) -> None:
    api.connect_container_to_network(container, network)
