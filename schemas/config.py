"""The one configuration model for the whole host.

Durations are written `30s`, `30m`, `1h`, `250ms` (a bare number means seconds);
sizes `512MB`, `16MiB`, `1G` (a bare number means bytes). See baaaht.common.config
for how file, environment and flags are merged.
"""

from __future__ import annotations

import re
from typing import Literal
from urllib.parse import urlsplit

import msgspec


class Duration(float):
    """Seconds; written as `30s`, `5m`, `1h`, `250ms`."""


class Size(int):
    """Bytes; written as `512MB`, `16MiB`, `1G`."""


class Section(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Config is not a bus message: an unknown key is a typo and is refused."""


class BusConfig(Section, kw_only=True):
    run_dir: str = "/run/baaaht"
    tcp_enabled: bool = False
    tcp_host: str = "127.0.0.1"
    tcp_port: int = 5555
    heartbeat_interval: Duration = Duration(1.0)
    heartbeat_liveness: int = 3
    max_message_size: Size = Size(16 * 1024 * 1024)
    event_history: int = 10_000
    event_history_bytes: Size = Size(64 * 1024 * 1024)
    max_event_size: Size = Size(2 * 1024 * 1024)
    call_timeout: Duration = Duration(10.0)
    # The sockets' group, joined by every agent container: a name (created when missing) or a gid, never 0.
    socket_group: str = "baaaht-agent"
    # CURVE on tcp:// (bus/curve.py). The broker keeps its key pair and the issued client keys here
    # ("": <data_dir>/bus-keys); a handshake not done within the timeout is closed (both sides).
    key_dir: str = ""
    tcp_handshake_timeout: Duration = Duration(5.0)
    # A client on another host: the file `baaaht-ctl auth keys issue` wrote. With it, the client
    # connects to tcp_host:tcp_port over CURVE instead of to the run directory's sockets.
    tcp_key_file: str = ""


class RuntimeConfig(Section, kw_only=True):
    type: str = "auto"
    timeout: Duration = Duration(30.0)
    max_concurrent_ops: int = 8


class DockerConfig(Section, kw_only=True):
    host: str = "unix:///var/run/docker.sock"
    tls_verify: bool = True
    tls_ca_cert: str = ""
    tls_cert: str = ""
    tls_key: str = ""


class LogConfig(Section, kw_only=True):
    level: Literal["debug", "info", "warn", "error"] = "info"
    format: Literal["json", "text"] = "json"


class SessionConfig(Section, kw_only=True):
    timeout: Duration = Duration(30 * 60.0)
    max_sessions: int = 100
    max_message_size: Size = Size(1024 * 1024)
    sweep_interval: Duration = Duration(5.0)
    close_timeout: Duration = Duration(30.0)


class PolicyConfig(Section, kw_only=True):
    path: str = ""
    max_containers: int = 10
    max_memory: Size = Size(512 * 1000 * 1000)
    reload_interval: Duration = Duration(2.0)


class ContainerConfig(Section, kw_only=True):
    reconcile_interval: Duration = Duration(60.0)
    orphan_grace: Duration = Duration(30.0)
    agent_image: str = ""
    # Defaults for what a create request leaves unset come from the policy document (quotas.default_*).
    # Path of the agents' bus directory inside agent containers (the host side is <bus.run_dir>/agent).
    agent_bus_mount: str = "/run/baaaht/agent"


class WorkspaceConfig(Section, kw_only=True):
    """Each session's workspace: an ext4 filesystem of this size in a sparse image under data_dir,
    mounted at /workspace in the session's worker containers (services/containers/workspaces.py)."""

    size: Size = Size(1024 * 1024 * 1024)


class PoolConfig(Section, kw_only=True):
    """The warm pool: worker containers started ahead of need, claimed by a session's first tool call."""

    size: int = 2  # unclaimed containers kept ready (baaaht-ctl pool resize changes it until a restart)
    max: int = 8  # the pool's own quota: at most this many unclaimed pool containers, and the largest size
    roles: list[str] = msgspec.field(default_factory=lambda: ["worker"])  # roles a claim may give


class LimitsConfig(Section, kw_only=True):
    """What one peer, caller, agent or session may take of the host's shared capacity, so that one
    of them flooding the bus cannot starve the others (see docs/PROTOCOL.md, "Fairness")."""

    # Requests a peer may have in flight through the broker at once (RESOURCE_EXHAUSTED beyond).
    agent_in_flight: int = 128
    host_in_flight: int = 4096
    # The bytes of an agent's request bodies in flight at once (its container's, all its connections
    # together). At least bus.max_message_size, so one message of the largest size always gets through;
    # two of them, not dozens: a service then receives and decodes at most that much of one agent's at
    # once, and its heartbeats and other callers' calls do not wait behind them. Host peers have none.
    agent_bytes_in_flight: Size = Size(32 * 1024 * 1024)
    # Calls from one caller a service holds queued, waiting for a handler thread; and how many of
    # one agent's calls a service runs at once (its share of the service's handler threads).
    queued_per_caller: int = 256
    agent_running_per_caller: int = 2
    # What an agent may publish: a token bucket per agent (its container; its connection without one).
    agent_events_per_second: float = 200.0
    agent_event_burst: int = 400
    agent_event_bytes_per_second: Size = Size(4 * 1024 * 1024)
    agent_event_burst_bytes: Size = Size(8 * 1024 * 1024)  # at least bus.max_event_size
    # Bytes of events an agent is sent by bus.events.replay, which the broker builds on its loop (or
    # a fixed cost for each kept event a replay looks at, when that is more): a page is cut at what is
    # left, one event at least, and refused while less than a tenth of a second's is left. At least
    # bus.max_event_size.
    agent_replay_bytes_per_second: Size = Size(16 * 1024 * 1024)
    # Agents' events are kept for replay in their own budget: they never evict the host's.
    agent_event_history: int = 1000
    agent_event_history_bytes: Size = Size(16 * 1024 * 1024)
    # What the agents of one session may cause, per minute (baaaht.common.session_quotas).
    session_messages_per_minute: int = 600
    # Their bytes (content and metadata): each message is a host event kept for replay with its content
    # (the broker's 64 MiB host history), and 600 of session.max_message_size a minute evicted it all in
    # seconds. At least session.max_message_size, so one message of the largest size always gets in.
    session_message_bytes_per_minute: Size = Size(8 * 1024 * 1024)
    session_cancels_per_minute: int = 60  # each publishes an event: a loop of them must not evict the history
    # Attempts the tasks an assistant submits may run (each task counts its retry.maximum_attempts)
    session_tasks_per_minute: int = 600


class CredentialsConfig(Section, kw_only=True):
    # The master key: a key file outside data_dir (made 0400 at the first start), unless a passphrase
    # is configured, from a file (outside data_dir) or from the environment variable named here.
    master_key_file: str = "/etc/baaaht/credentials.key"
    passphrase_file: str = ""
    passphrase_env: str = ""
    grace_period: Duration = Duration(24 * 3600.0)  # a rotated secret's previous version is kept this long
    sweep_interval: Duration = Duration(10.0)  # last-use writes, erasing retired versions, expiry events


class SchedulerConfig(Section, kw_only=True):
    # A task's heartbeat timeout when it sets none: a worker that dies loses its lease after this long.
    lease_timeout: Duration = Duration(30.0)
    cancel_grace: Duration = Duration(10.0)  # a running task asked to cancel ends cancelled after this
    max_payload: Size = Size(256 * 1024)
    max_result: Size = Size(256 * 1024)
    key_retention: Duration = Duration(24 * 3600.0)  # how long an idempotency key answers its task
    # Finished tasks (succeeded, failed, cancelled, dead) are forgotten this long after they finished;
    # 0 keeps them for ever. Looked for every prune_interval.
    task_retention: Duration = Duration(7 * 24 * 3600.0)
    prune_interval: Duration = Duration(60.0)
    # Limits: 0 is none. Rates are task starts per second (a token bucket holding one second's worth).
    queue_max_running: dict[str, int] = {}
    queue_rate: dict[str, float] = {}
    session_max_running: int = 0
    session_rate: float = 0.0
    # Tasks not finished (queued, leased, running) a session may hold; a submit past it is refused
    # RESOURCE_EXHAUSTED. 0 is none. Host submits without a session are not counted.
    session_max_unfinished: int = 10000


EGRESS_INJECTIONS = ("bearer", "x-api-key", "header", "basic")
# Paths that mint or manage keys, users or organisations at Anthropic (/v1/organizations/...: admin API
# keys, workspaces, invites) and OpenAI (/v1/organization/...: admin keys, projects' api_keys, users),
# and work billed to the key whose tokens no answer reports, so that egress.session_tokens cannot count
# them: message batches (Anthropic /v1/messages/batches, OpenAI /v1/batches: one call starts up to 100k
# model calls) and OpenAI's fine-tuning jobs. An agent holding a route to the API never reaches them,
# whatever the route's own prefixes say.
DEFAULT_EGRESS_DENY_PATHS = [
    "/v1/organizations",
    "/v1/organization",
    "/v1/api_keys",
    "/v1/admin",
    "/v1/messages/batches",
    "/v1/batches",
    "/v1/fine_tuning",
]


class EgressRoute(Section, kw_only=True):
    """One upstream an agent may reach through the egress proxy, as `http://egress/<name>/<path>`."""

    name: str  # the first path part of the proxy URL: a-z, 0-9, '-', '_'
    upstream: str  # base URL: https://api.anthropic.com (http only to loopback with allow_loopback_http)
    credential: str  # the secret's name in the credential store
    inject: Literal["bearer", "x-api-key", "header", "basic"] = "bearer"
    header: str = ""  # the header's name, for inject: header
    methods: list[str] = msgspec.field(default_factory=lambda: ["POST"])
    paths: list[str]  # allowed path prefixes (whole segments), relative to the upstream base URL
    roles: list[str]  # roles allowed: agent, assistant, worker
    sessions: list[str] = msgspec.field(
        default_factory=lambda: ["*"]
    )  # session ids allowed, or "*" for every session
    usage: Literal["anthropic", "openai", "none"] = "none"  # how responses report LLM tokens
    allow_loopback_http: bool = False  # tests only: a plain-http upstream on 127.0.0.1/::1

    def __post_init__(self) -> None:
        problem = egress_route_problem(self)
        if problem:
            raise ValueError(f"route {self.name!r}: {problem}")


def egress_route_problem(route: EgressRoute) -> str:
    """What makes a route unusable, or "" (also checked by the proxy before serving)."""
    if not _ROUTE_NAME.fullmatch(route.name):
        return "name must be 1-64 of a-z, 0-9, '-' or '_', starting with a letter or a digit"
    parts = urlsplit(route.upstream)
    loopback = parts.hostname in ("127.0.0.1", "::1", "localhost")
    if parts.scheme != "https" and not (parts.scheme == "http" and route.allow_loopback_http and loopback):
        return (
            f"upstream {route.upstream!r} must be https:// (http only to loopback with allow_loopback_http)"
        )
    if not parts.hostname or parts.query or parts.fragment or parts.username or parts.password:
        return f"upstream {route.upstream!r} must be scheme://host[:port][/base path], nothing else"
    if route.inject == "header" and not _HEADER_NAME.fullmatch(route.header):
        return "inject: header needs `header`, a header name"
    if not route.paths or any(not p.startswith("/") for p in route.paths):
        return "paths must be a non-empty list of prefixes starting with '/'"
    if not route.roles:
        return "roles must name at least one role (agent, assistant, worker)"
    if not route.methods or any(not m.isalpha() or not m.isupper() for m in route.methods):
        return "methods must be a non-empty list of upper-case HTTP methods"
    return ""


_ROUTE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_HEADER_NAME = re.compile(r"[A-Za-z0-9-]{1,64}")


class EgressConfig(Section, kw_only=True):
    routes: list[EgressRoute] = []  # default deny: no route, no egress
    ca_file: str = ""  # extra CA bundle trusted for upstreams (tests: the fake upstream's CA)
    deny_paths: list[str] = msgspec.field(
        default_factory=lambda: list(DEFAULT_EGRESS_DENY_PATHS)
    )  # refused on every route (key management; batches and fine-tuning, which no budget counts)
    max_request_size: Size = Size(32 * 1024 * 1024)
    max_response_size: Size = Size(256 * 1024 * 1024)
    upstream_timeout: Duration = Duration(600.0)  # a whole upstream call, streamed or not
    connect_timeout: Duration = Duration(10.0)
    # Per session, across routes; 0 is no cap.
    session_requests: int = 0
    session_tokens: int = 0
    # Refused calls (nothing forwarded) of one session (of one container without an identity) written
    # and published one by one per minute; past it they are counted and summed up once a minute (0: only
    # the summaries). Calls that reach an upstream are always recorded one by one.
    refusals_per_minute: int = 60


class AssistantConfig(Section, kw_only=True):
    """The session's assistant (docs/ASSISTANT.md): started per session by the container manager on the
    session's first user message, from the agent image, hardened like every agent."""

    autostart: bool = True  # start it for a session's user message; off: the operator starts it
    image: str = ""  # "": container.agent_image (the agent image of this checkout)
    command: str = "baaaht-agent"  # the program the container runs
    args: list[str] = msgspec.field(default_factory=lambda: ["assistant"])
    workdir: str = ""  # its working directory in the container ("": the image's; dev mode: /app)
    # Dev mode: `dev_source`, a host directory, is bind-mounted read-only at the working directory
    # (judged by the policy's mount rules like any mount), for iterating without rebuilding the image.
    dev_mode: bool = False
    dev_source: str = ""
    # false only with dev_mode: a documented development exception, logged at every start.
    readonly_rootfs: bool = True
    provider: Literal["anthropic", "openai"] = "anthropic"
    model: str = "claude-sonnet-4-5"
    route: str = ""  # the egress route (egress.routes) its model calls go through; "": the provider's name
    max_turns: int = 20  # model calls for one user message
    max_tool_calls: int = 50  # tool calls for one user message
    context_budget: int = 100_000  # tokens of conversation sent to the model (oldest turns dropped first)


class Config(Section, kw_only=True):
    data_dir: str = "/var/lib/baaaht"
    bus: BusConfig = msgspec.field(default_factory=BusConfig)
    runtime: RuntimeConfig = msgspec.field(default_factory=RuntimeConfig)
    docker: DockerConfig = msgspec.field(default_factory=DockerConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    session: SessionConfig = msgspec.field(default_factory=SessionConfig)
    policy: PolicyConfig = msgspec.field(default_factory=PolicyConfig)
    container: ContainerConfig = msgspec.field(default_factory=ContainerConfig)
    workspace: WorkspaceConfig = msgspec.field(default_factory=WorkspaceConfig)
    pool: PoolConfig = msgspec.field(default_factory=PoolConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    credentials: CredentialsConfig = msgspec.field(default_factory=CredentialsConfig)
    scheduler: SchedulerConfig = msgspec.field(default_factory=SchedulerConfig)
    egress: EgressConfig = msgspec.field(default_factory=EgressConfig)
    assistant: AssistantConfig = msgspec.field(default_factory=AssistantConfig)
