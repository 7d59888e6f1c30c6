"""The container runtime seam: what the container service needs from an engine, and how one is chosen.

A runtime knows nothing of the bus: it raises the `EngineError` kinds below (not found, conflict, wrong
state, invalid, unavailable, timeout, failure), and the container service maps them to bus codes in one
place (services/containers/engine_errors.py).
Long-lived answers (wait, logs, stats, pull, events) come back as a `Stream`: an iterator that another
thread may `close()` to end it at once, which is how caller cancellation and deadlines reach the engine.
"""

from __future__ import annotations

import importlib.metadata
import logging
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol, TypeVar

from baaaht.schemas.config import Config
from baaaht.schemas.containers import (
    ContainerHealthReport,
    ContainerInfo,
    ContainerLogs,
    ContainerSpec,
    ContainerSummary,
    ExecResult,
    ImageStatus,
    LogLine,
    PullProgress,
    StatsSample,
    VolumeInfo,
    WaitResult,
)

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "baaaht.runtimes"

T = TypeVar("T", covariant=True)


class EngineError(Exception):
    """Base of everything a runtime raises about an operation; `target` names what it was about (a
    container, image or volume), `details` adds facts the engine gave (e.g. its HTTP status)."""

    def __init__(self, message: str, *, target: str = "", details: dict[str, object] | None = None):
        super().__init__(message)
        self.message = message
        self.target = target
        self.details = details or {}


class NotFound(EngineError):
    """No such container, image or volume."""


class Conflict(EngineError):
    """The name is taken (a container or volume of that name exists)."""


class WrongState(EngineError):
    """The object is not in the state the operation needs (not running, already paused, in use)."""


class Invalid(EngineError):
    """The engine refused the request as malformed (a bad signal, option or reference)."""


class EngineUnavailable(EngineError):
    """The engine cannot be reached, the connection broke, or what it needs elsewhere (a registry) is away."""


class EngineTimeout(EngineError):
    """The engine did not answer within `runtime.timeout`."""


class EngineFailure(EngineError):
    """The engine failed in a way none of the above describes."""


class Stream(Protocol[T]):
    def __iter__(self) -> Iterator[T]: ...

    def close(self) -> None:
        """End the iteration from any thread; the iterator then stops without an error."""


@dataclass(frozen=True)
class EngineEvent:
    """One entry of the engine's own event stream, normalised."""

    kind: str  # "container" or "image"
    action: str  # the engine's verb: create, start, die, destroy, health_status: healthy, pull, ...
    id: str
    time: float
    attributes: dict[str, str] = field(default_factory=dict)


class Runtime(Protocol):
    name: str

    def ping(self) -> str:
        """A one-line description of the engine; raises EngineUnavailable when it does not answer."""

    def create(self, spec: ContainerSpec) -> tuple[str, list[str]]:
        """Create (not start) a container exactly as specified; returns (id, engine warnings)."""

    def start(self, container: str) -> None: ...

    def stop(self, container: str, timeout: float) -> None: ...

    def restart(self, container: str, timeout: float) -> None: ...

    def kill(self, container: str, signal: str) -> None: ...

    def pause(self, container: str) -> None: ...

    def unpause(self, container: str) -> None: ...

    def remove(self, container: str, force: bool, volumes: bool) -> None: ...

    def wait(self, container: str) -> Stream[WaitResult]:
        """Yields one WaitResult when the container is no longer running; no time limit of its own."""

    def inspect(self, container: str) -> ContainerInfo: ...

    def health(self, container: str) -> ContainerHealthReport: ...

    def list(self, labels: dict[str, str]) -> list[ContainerSummary]:
        """Every container (any state) carrying all of `labels`."""

    def logs(self, container: str, options: ContainerLogs) -> Stream[LogLine]: ...

    def stats(self, container: str) -> StatsSample: ...

    def exec(self, container: str, command: list[str], env: dict[str, str], working_dir: str) -> ExecResult:
        """Run a command in a running container as its own user and wait for it to end."""

    def stats_stream(self, container: str) -> Stream[StatsSample]:
        """About one sample a second until the container stops or the stream is closed."""

    def image_exists(self, image: str) -> ImageStatus: ...

    def pull(self, image: str) -> Stream[PullProgress]: ...

    def create_volume(self, name: str, labels: dict[str, str]) -> VolumeInfo:
        """A named local volume; raises Conflict when the name is taken by a volume with other labels."""

    def inspect_volume(self, name: str) -> VolumeInfo: ...

    def list_volumes(self, labels: dict[str, str]) -> list[VolumeInfo]:
        """Every volume carrying all of `labels`."""

    def remove_volume(self, name: str) -> None:
        """Raises WrongState while a container uses it."""

    def events(self, since: float) -> Stream[EngineEvent]:
        """Container and image events from `since` (unix time, 0 = from now) on, until closed."""

    def close(self) -> None: ...


RuntimeFactory = Callable[[Config], Runtime]


class RuntimeConfigError(ValueError):
    """The configuration names a runtime that does not exist or cannot be set up as written."""


class RuntimeUnavailable(Exception):
    """The configured runtime cannot work on this host at all (not merely: its engine is down)."""


def _builtin_factories() -> dict[str, RuntimeFactory]:
    from baaaht.services.containers.apple import AppleRuntime
    from baaaht.services.containers.docker_runtime import DockerRuntime

    return {"docker": DockerRuntime, "apple": AppleRuntime}


def runtime_factories() -> dict[str, RuntimeFactory]:
    """Built-in runtimes, plus custom ones registered under the `baaaht.runtimes` entry-point group.
    A plug-in cannot replace a built-in name."""
    factories: dict[str, RuntimeFactory] = {}
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            factories[entry.name] = entry.load()
        except Exception as exc:  # a broken plug-in must not hide the others
            log.error("runtime plug-in %r (%s) failed to load: %s", entry.name, entry.value, exc)
    factories.update(_builtin_factories())
    return factories


def select_runtime(
    config: Config, *, platform: str = sys.platform, factories: dict[str, RuntimeFactory] | None = None
) -> Runtime:
    """The runtime `runtime.type` asks for. Raises RuntimeConfigError for an unknown name and
    RuntimeUnavailable when the named runtime cannot run here."""
    factories = runtime_factories() if factories is None else factories
    wanted = config.runtime.type
    if wanted == "auto":
        return _detect(config, platform, factories)
    if wanted not in factories:
        known = ", ".join(["auto", *sorted(factories)])
        raise RuntimeConfigError(f"runtime.type {wanted!r} is not a known container runtime (known: {known})")
    return factories[wanted](config)


def _detect(config: Config, platform: str, factories: dict[str, RuntimeFactory]) -> Runtime:
    # On macOS Apple Containers come first when their CLI answers; everywhere else (and as the
    # fallback) Docker, even if its engine is down right now: it is reported unhealthy until it answers.
    if platform == "darwin" and "apple" in factories:
        try:
            return factories["apple"](config)
        except RuntimeUnavailable as exc:
            log.info("runtime auto: apple runtime not usable (%s); using docker", exc)
    return factories["docker"](config)
