"""A proxy under test in this process: a fake upstream, fake secrets, a caller identity for this
process's own pid (the real lookup needs a container; tests/test_egress_container.py has one)."""

from __future__ import annotations

import base64
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from baaaht.bus.testing import FakeBus, short_run_dir
from baaaht.bus.testing.fake_llm import FakeLLM
from baaaht.common.identity import AgentIdentity, IdentityStore
from baaaht.schemas.config import BusConfig, Config, EgressConfig, EgressRoute
from baaaht.services.credentials.egress.server import EgressServer
from baaaht.services.credentials.source import Secret, SecretExpired, SecretNotFound, SecretSource

CONTAINER = "c" * 64
SESSION = "s1"
ANTHROPIC_KEY = b"sk-ant-test-3f9c1e77a2b54d0e"
OPENAI_KEY = b"sk-openai-test-9d2b7c41e0aa"


@dataclass
class FakeSecrets:
    """The credential store's in-process interface, from a dict."""

    values: dict[str, tuple[str, bytes]]
    expired: set[str] = field(default_factory=set)
    used: list[str] = field(default_factory=list)

    def secret_for(self, name: str) -> Secret:
        if name in self.expired:
            raise SecretExpired(name, time.time() - 60)
        if name not in self.values:
            raise SecretNotFound(name)
        kind, value = self.values[name]
        return Secret(name=name, kind=kind, version=1, value=value)

    def mark_used(self, name: str) -> None:
        self.used.append(name)


@dataclass
class OwnPid:
    """Callers: this process is container CONTAINER (when `inside`), identities from the store."""

    store: IdentityStore
    inside: bool = True
    looked_up: int = 0

    def container_of(self, pid: int) -> str | None:
        self.looked_up += 1
        return CONTAINER if self.inside and pid == os.getpid() else None

    def identity(self, container_id: str) -> AgentIdentity | None:
        return self.store.get(container_id)


def routes_for(upstream_url: str) -> list[EgressRoute]:
    common = dict(upstream=upstream_url, roles=["agent", "assistant"])
    return [
        EgressRoute(
            name="anthropic",
            credential="anthropic",
            inject="x-api-key",
            methods=["POST", "GET"],
            paths=["/v1/messages", "/v1/models", "/redirect", "/bytes"],
            usage="anthropic",
            **common,
        ),
        EgressRoute(
            name="openai",
            credential="openai",
            inject="bearer",
            paths=["/v1/chat/completions"],
            usage="openai",
            **common,
        ),
        EgressRoute(
            name="other-session",
            credential="anthropic",
            paths=["/v1/messages"],
            sessions=["s2"],
            **common,
        ),
        EgressRoute(
            name="workers",
            credential="anthropic",
            paths=["/v1/messages"],
            upstream=upstream_url,
            roles=["worker"],
        ),
        EgressRoute(name="expired", credential="old", paths=["/v1/messages"], **common),
    ]


@dataclass
class Egress:
    upstream: FakeLLM
    server: EgressServer
    events: FakeBus
    secrets: FakeSecrets | SecretSource
    callers: OwnPid
    socket_path: str
    data_dir: Path
    run_dir: Path

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(
            transport=httpx.HTTPTransport(uds=self.socket_path), base_url="http://egress", **kwargs
        )

    def secret_forms(self) -> list[bytes]:
        return secret_forms([ANTHROPIC_KEY, OPENAI_KEY])


def secret_forms(secrets: list[bytes]) -> list[bytes]:
    """What a leak of each secret would look like: its bytes and their base64."""
    return [form for secret in secrets for form in (secret, base64.b64encode(secret))]


def identify(run_dir: Path, role: str = "agent", session: str = SESSION) -> IdentityStore:
    store = IdentityStore(str(run_dir))
    store.put(
        AgentIdentity(
            container_id=CONTAINER, session_id=session, role=role, install_id="test", issued_at=time.time()
        )
    )
    return store


@contextmanager
def running_egress(
    tmp_path: Path,
    *,
    role: str = "agent",
    agent_gid: int | None = None,
    secrets: SecretSource | None = None,
    **egress_settings,
):
    """With `agent_gid`, the agents' directory is of that group and callers are found the real way
    (peer pid -> /proc cgroup -> identity file), as for containers; else this process is the caller.
    `secrets` (holding ANTHROPIC_KEY and OPENAI_KEY under those names) replaces the FakeSecrets."""
    # Short, for the AF_UNIX path limit; a new one on each run (a second run on the same tmp_path is a
    # restart: what lasts is in the data directory).
    run_dir = Path(short_run_dir("be-"))
    try:
        (run_dir / "agent").mkdir()
        if agent_gid is not None:
            for directory in (run_dir, run_dir / "agent"):
                os.chown(directory, -1, agent_gid)
                directory.chmod(0o750)
        store = identify(run_dir, role)
        with FakeLLM(tmp_path / "upstream") as upstream:
            settings = {"routes": routes_for(upstream.url), "ca_file": upstream.ca_file, **egress_settings}
            config = Config(
                data_dir=str(tmp_path / "data"),
                bus=BusConfig(run_dir=str(run_dir)),
                egress=EgressConfig(**settings),
            )
            fakes = FakeSecrets({"anthropic": ("api_key", ANTHROPIC_KEY), "openai": ("api_key", OPENAI_KEY)})
            fakes.expired.add("old")
            secrets = secrets or fakes
            events = FakeBus()
            callers = OwnPid(store)
            server = EgressServer.for_config(
                config, secrets, events, callers=None if agent_gid is not None else callers
            )
            server.start()
            try:
                yield Egress(
                    upstream,
                    server,
                    events,
                    secrets,
                    callers,
                    str(run_dir / "agent" / "egress.sock"),
                    tmp_path / "data",
                    run_dir,
                )
            finally:
                server.stop()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
