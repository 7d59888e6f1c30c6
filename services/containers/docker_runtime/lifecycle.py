"""Container life cycle: create (with its extra networks), start, stop, restart, kill, pause, remove, and
the wait for its end."""

from __future__ import annotations

import contextlib
from typing import Iterator

from baaaht.schemas.containers import ContainerSpec, WaitResult
from baaaht.services.containers.docker_runtime.connection import Connection
from baaaht.services.containers.docker_runtime.spec import create_args
from baaaht.services.containers.docker_runtime.streams import EngineStream
from baaaht.services.containers.runtime import EngineError


class Lifecycle:
    engine: Connection

    def create(self, spec: ContainerSpec) -> tuple[str, list[str]]:
        extra_networks = spec.networks[1:] if spec.network_mode == "" else spec.networks
        created = self.engine.call(
            "create", spec.name, lambda api: api.create_container(**create_args(spec, api._version))
        )
        container = created["Id"]
        for network in extra_networks:
            try:
                self.engine.call(
                    "connect network",
                    network,
                    lambda api, network=network: api.connect_container_to_network(container, network),
                )
            except EngineError:
                # A half-made container must not stay behind.
                with contextlib.suppress(Exception):
                    self.engine.api().remove_container(container, force=True)
                raise
        return container, list(created.get("Warnings") or [])

    def start(self, container: str) -> None:
        self.engine.call("start", container, lambda api: api.start(container))

    def stop(self, container: str, timeout: float) -> None:
        # The SDK adds the stop timeout to the HTTP timeout, so a slow stop is not cut short.
        self.engine.call("stop", container, lambda api: api.stop(container, timeout=int(round(timeout))))

    def restart(self, container: str, timeout: float) -> None:
        self.engine.call(
            "restart", container, lambda api: api.restart(container, timeout=int(round(timeout)))
        )

    def kill(self, container: str, signal: str) -> None:
        self.engine.call("kill", container, lambda api: api.kill(container, signal=signal))

    def pause(self, container: str) -> None:
        self.engine.call("pause", container, lambda api: api.pause(container))

    def unpause(self, container: str) -> None:
        self.engine.call("unpause", container, lambda api: api.unpause(container))

    def remove(self, container: str, force: bool, volumes: bool) -> None:
        self.engine.call(
            "remove", container, lambda api: api.remove_container(container, v=volumes, force=force)
        )

    def wait(self, container: str) -> EngineStream[WaitResult]:
        def parse(api, response) -> Iterator[WaitResult]:
            body = api._result(response, json=True)
            error = (body.get("Error") or {}).get("Message", "")
            yield WaitResult(exit_code=body.get("StatusCode", -1), error=error)

        return self.engine.open_stream(
            "wait", container, "post", "/containers/{0}/wait", {"condition": "not-running"}, parse
        )
