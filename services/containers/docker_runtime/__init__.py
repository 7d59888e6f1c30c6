"""The Docker runtime: the Runtime protocol over the docker SDK's low-level API client, one module per job.

`connection` (TLS, the client made on first use, calls and streams), `errors` (SDK exceptions -> the
runtime's error kinds), `spec` (ContainerSpec -> create arguments), `lifecycle`, `inspection` (inspect,
health, listing), `logs`, `stats`, `execs`, `images`, `volumes` and `events` (the engine's feed).

Short calls carry `runtime.timeout` as their HTTP timeout. Long calls (wait, logs, stats stream, pull,
events) have no client-side limit at all: they return an EngineStream that the service closes when the
caller cancels or its deadline passes, so a wait lasts exactly as long as the caller wants.
"""

from __future__ import annotations

from baaaht.schemas.config import Config
from baaaht.services.containers.docker_runtime.connection import Connection
from baaaht.services.containers.docker_runtime.events import Events
from baaaht.services.containers.docker_runtime.execs import Execs
from baaaht.services.containers.docker_runtime.images import Images
from baaaht.services.containers.docker_runtime.inspection import Inspection
from baaaht.services.containers.docker_runtime.lifecycle import Lifecycle
from baaaht.services.containers.docker_runtime.logs import Logs
from baaaht.services.containers.docker_runtime.stats import Stats
from baaaht.services.containers.docker_runtime.volumes import Volumes


class DockerRuntime(Lifecycle, Inspection, Logs, Stats, Execs, Images, Volumes, Events):
    name = "docker"

    def __init__(self, config: Config):
        self.engine = Connection(config.docker, float(config.runtime.timeout))

    def ping(self) -> str:
        version = self.engine.call("ping", "", lambda api: api.version(api_version=False))
        api_version = version.get("ApiVersion", "?")
        return f"docker {version.get('Version', '?')} (API {api_version}) at {self.engine.host}"

    def close(self) -> None:
        self.engine.close()
