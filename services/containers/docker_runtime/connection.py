"""The connection to one Docker engine: TLS settings, the API client made on first use, and the two ways
of calling it (a short call bounded by `runtime.timeout`, a stream with no read timeout at all)."""

from __future__ import annotations

import logging
import os
import threading
from typing import Callable, Iterator, TypeVar
from urllib.parse import urlparse

import docker
import requests

from baaaht.schemas.config import DockerConfig
from baaaht.services.containers.docker_runtime.errors import EngineErrors
from baaaht.services.containers.docker_runtime.streams import EngineStream
from baaaht.services.containers.runtime import RuntimeConfigError

log = logging.getLogger(__name__)

T = TypeVar("T")
# Streams (waits, log followers, event feed) each hold a connection: the pool must not be the limit.
MAX_POOL_SIZE = 128

Parser = Callable[[docker.APIClient, requests.Response], Iterator[T]]


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


class Connection:
    def __init__(self, cfg: DockerConfig, timeout: float):
        self.host = cfg.host
        self.timeout = timeout
        self.errors = EngineErrors(self.host, timeout)
        self._tls = tls_config(cfg)
        self._client: docker.APIClient | None = None
        self._socket_path = urlparse(self.host).path if self.host.startswith("unix://") else ""
        self._connect_lock = threading.Lock()

    # The client is made on first use, not at construction: a service must start (and report itself
    # unhealthy) while the engine is down, and connect once it answers.
    def api(self) -> docker.APIClient:
        # A missing socket file is the common "engine down" case: say so plainly (and do not make the
        # SDK open a socket that it then leaks when the connect fails).
        if self._socket_path and not os.path.exists(self._socket_path):
            raise self.errors.unreachable(FileNotFoundError(f"{self._socket_path} does not exist"))
        client = self._client
        if client is not None:
            return client
        with self._connect_lock:
            if self._client is None:
                with self.errors.translate("connect"):
                    self._client = docker.APIClient(
                        base_url=self.host,
                        version="auto",
                        timeout=self.timeout,
                        tls=self._tls,
                        max_pool_size=MAX_POOL_SIZE,
                    )
            return self._client

    def call(self, operation: str, target: str, fn: Callable[[docker.APIClient], T]) -> T:
        with self.errors.translate(operation, target):
            return fn(self.api())

    def open_stream(
        self, operation: str, target: str, method: str, path: str, params: dict, parse: Parser
    ) -> EngineStream:
        """A streaming request with no read timeout: the caller's deadline ends it, via close()."""
        api = self.api()
        with self.errors.translate(operation, target):
            send = api._post if method == "post" else api._get
            response = send(
                api._url(path, target) if target else api._url(path), params=params, stream=True, timeout=None
            )
            try:
                api._raise_for_status(response)
            except BaseException:
                response.close()  # an error status: its connection is not left to the garbage collector
                raise
        return EngineStream(response, parse(api, response), f"{operation} {target}".strip())

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
