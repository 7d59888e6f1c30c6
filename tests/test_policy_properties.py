"""Properties over random container specs, policies and session overrides (hypothesis)."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from baaaht.common.policy import document
from baaaht.common.policy.document import CAPABILITIES, DocumentError, HostDefaults
from baaaht.schemas.containers import ContainerSpec, Mount, PortBinding, Resources
from baaaht.schemas.policy import Principal
from baaaht.services.policy import engine, overrides
from baaaht.services.policy.mounts import HostPaths

DEFAULTS = HostDefaults(max_memory=512 * 1024 * 1024, max_containers=10)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

CAPS = sorted(CAPABILITIES)
IMAGES = [
    "busybox:1.36",
    "busybox",
    "python:latest",
    "localhost:5000/img",
    "ghcr.io/org/app:1",
    f"registry:5000/ns/img:1@sha256:{'c' * 64}",
    "Bad Image",
    "",
]
USERS = [
    "",
    "0",
    "00",
    "root",
    "root:root",
    "0:0",
    "1000",
    "1000:1000",
    "1000:0",
    "nobody",
    "app:1000",
    "1001:1001",
]
PATHS = [
    "/",
    "/etc",
    "/srv",
    "/srv/data",
    "/home/alice/.ssh",
    "/var/run/docker.sock",
    "/tmp/../etc",
    "relative",
    "",
    "/run/baaaht/agent",
    "/proc/self/root",
]
OPTIONS = [
    "no-new-privileges",
    "no-new-privileges:true",
    "no-new-privileges=false",
    "seccomp=unconfined",
    "apparmor:unconfined",
    "label=disable",
]
MODES = ["", "none", "bridge", "host", "container:abc", "backend"]
SMALL_TEXT = st.text(max_size=12)


def mounts() -> st.SearchStrategy[Mount]:
    return st.builds(
        Mount,
        type=st.sampled_from(["bind", "volume", "tmpfs"]),
        target=st.sampled_from(["/data", "/tmp", "/run/baaaht"]),
        source=st.one_of(st.sampled_from(PATHS), st.sampled_from(["data", "baaaht-x"]), SMALL_TEXT),
        read_only=st.booleans(),
        tmpfs_size=st.integers(min_value=-(2**40), max_value=2**40),
    )


SPECS = st.builds(
    ContainerSpec,
    image=st.one_of(st.sampled_from(IMAGES), SMALL_TEXT),
    env=st.dictionaries(SMALL_TEXT, SMALL_TEXT, max_size=3),
    labels=st.dictionaries(
        st.sampled_from(["user", "privileged", "username"]), st.sampled_from(["root", "true", "0"])
    ),
    mounts=st.lists(mounts(), max_size=4),
    ports=st.lists(
        st.builds(
            PortBinding,
            container_port=st.integers(0, 70000),
            host_ip=st.one_of(st.sampled_from(["127.0.0.1", "::1", "0.0.0.0", "", "10.1.2.3"]), SMALL_TEXT),
        ),
        max_size=2,
    ),
    networks=st.lists(st.one_of(st.sampled_from(["bridge", "backend"]), SMALL_TEXT), max_size=2),
    network_mode=st.one_of(st.sampled_from(MODES), SMALL_TEXT),
    resources=st.builds(
        Resources,
        cpus=st.floats(allow_nan=True, allow_infinity=True),
        memory=st.integers(-(2**40), 2**40),
        memory_swap=st.integers(-(2**40), 2**40),
        pids=st.integers(-10, 10_000),
    ),
    read_only_rootfs=st.one_of(st.none(), st.booleans()),
    user=st.one_of(st.sampled_from(USERS), SMALL_TEXT),
    group_add=st.lists(st.one_of(st.sampled_from(["0", "1000", "docker"]), SMALL_TEXT), max_size=2),
    cap_add=st.lists(st.one_of(st.sampled_from([*CAPS, "ALL", "cap_net_raw"]), SMALL_TEXT), max_size=3),
    cap_drop=st.lists(st.sampled_from([*CAPS, "ALL"]), max_size=3),
    security_opt=st.lists(st.one_of(st.sampled_from(OPTIONS), SMALL_TEXT), max_size=3),
    privileged=st.booleans(),
)


# Close to what the container manager sends: often allowed, so properties of allowed specs get examples.
LIKELY_ALLOWED = st.builds(
    ContainerSpec,
    image=st.sampled_from(["busybox:1.36", "ghcr.io/org/app:1", f"busybox@sha256:{'d' * 64}"]),
    mounts=st.lists(
        st.builds(
            Mount,
            type=st.sampled_from(["tmpfs", "volume", "bind"]),
            target=st.just("/data"),
            source=st.sampled_from(["", "/srv/data", "/srv/data/../data"]),
            read_only=st.booleans(),
            tmpfs_size=st.integers(0, 64 * 1024 * 1024),
        ),
        max_size=2,
    ),
    network_mode=st.sampled_from(["", "none"]),
    resources=st.builds(
        Resources,
        cpus=st.sampled_from([0.0, 0.5, 1.0]),
        memory=st.sampled_from([0, 64 * 1024 * 1024]),
        memory_swap=st.sampled_from([0, 64 * 1024 * 1024]),
        pids=st.sampled_from([0, 100]),
    ),
    read_only_rootfs=st.sampled_from([None, True]),
    user=st.sampled_from(["1000", "1000:1000", "1001:1001"]),
    cap_drop=st.lists(st.sampled_from(["ALL", "NET_RAW", "chown"]), max_size=2),
    security_opt=st.lists(st.sampled_from(["no-new-privileges", "no-new-privileges:true"]), max_size=1),
)


def optional(**fields) -> st.SearchStrategy[dict]:
    return st.fixed_dictionaries({}, optional=fields)


ALLOW_ENTRY = st.fixed_dictionaries(
    {
        "path": st.sampled_from(["/", "/srv", "/srv/data", "/home/*", "/etc"]),
        "mode": st.sampled_from(["denied", "readonly", "readwrite"]),
    },
    optional={"user": st.sampled_from(["alice", "bob"])},
)
# Valid partial policy documents: used both as host policies and as session overrides.
DOCUMENTS = optional(
    mode=st.sampled_from(["strict", "permissive", "disabled"]),
    quotas=optional(
        max_cpus=st.floats(0.5, 16),
        max_memory=st.integers(64 * 1024 * 1024, 4 * 1024**3),
        max_memory_swap=st.one_of(st.just("unlimited"), st.integers(4 * 1024**3, 8 * 1024**3)),
        max_pids=st.integers(1, 5000),
        max_containers=st.integers(1, 20),
        max_containers_per_session=st.integers(1, 20),
    ),
    mounts=optional(
        allow_bind=st.booleans(),
        allowlist=st.lists(ALLOW_ENTRY, max_size=3),
        blocked_patterns=st.lists(st.sampled_from([".cache", "/srv/data", "secret*"]), max_size=2),
        allow_volumes=st.booleans(),
        allowed_volumes=st.lists(st.sampled_from(["*", "baaaht-*", "data"]), max_size=2),
        allow_tmpfs=st.booleans(),
        max_tmpfs_size=st.integers(1, 2**32),
    ),
    images=optional(
        allowed=st.lists(st.sampled_from(["*", "busybox", "ghcr.io/org/*", "registry:5000/*"]), max_size=2),
        denied=st.lists(st.sampled_from(["python", "docker.io/*"]), max_size=1),
        require_digest=st.booleans(),
        allow_latest=st.booleans(),
    ),
    network=optional(
        allow_network=st.booleans(),
        allow_host_network=st.booleans(),
        allowed_networks=st.lists(st.sampled_from(["*", "backend", "bridge"]), max_size=2),
        allow_ports=st.booleans(),
        allow_public_ports=st.booleans(),
    ),
    security=optional(
        allow_privileged=st.booleans(),
        require_non_root=st.booleans(),
        allowed_capabilities=st.lists(st.sampled_from(["NET_RAW", "NET_BIND_SERVICE", "CHOWN"]), max_size=2),
        allowed_uids=st.lists(st.sampled_from([0, 1000, 1001]), max_size=2),
        require_no_new_privileges=st.booleans(),
        require_read_only_rootfs=st.booleans(),
        allow_security_opt=st.booleans(),
    ),
)
PRINCIPALS = st.builds(
    Principal, user=st.sampled_from(["", "alice", "bob"]), groups=st.lists(st.sampled_from(["dev"]))
)
COUNTS = st.builds(
    engine.Counts,
    host=st.one_of(st.none(), st.integers(0, 30)),
    session=st.one_of(st.none(), st.integers(0, 30)),
)


@pytest.fixture(scope="module")
def host(tmp_path_factory) -> HostPaths:
    run = tmp_path_factory.mktemp("run")
    (run / "agent").mkdir()
    return HostPaths(
        protected=("/var/lib/baaaht", str(run), "/var/run/docker.sock"), system_mounts=(str(run / "agent"),)
    )


def load(data: dict) -> document.LoadedPolicy:
    try:
        return document.LoadedPolicy.of(document.load(data, DEFAULTS), "test", 0.0)
    except DocumentError:
        assume(False)  # a contradictory random document (say, a default above its maximum)
        raise


def judge(spec, principal, policy, host, counts) -> engine.Judgement:
    return engine.evaluate(spec, principal, policy, host, counts)


@SETTINGS
@given(spec=SPECS, data=DOCUMENTS, principal=PRINCIPALS, counts=COUNTS)
def test_evaluate_never_crashes_and_its_result_crosses_the_bus(host, spec, data, principal, counts):
    policy, _ = overrides.tighten(load(data), {})
    judgement = judge(spec, principal, policy, host, counts)
    assert judgement.outcome in ("allow", "deny", "permissive", "disabled")
    msgspec.msgpack.encode(judgement.enforced)
    msgspec.msgpack.encode(judgement.violations)


@SETTINGS
@given(spec=SPECS, data=DOCUMENTS, principal=PRINCIPALS, counts=COUNTS)
def test_strict_never_allows_a_violation(host, spec, data, principal, counts):
    policy, _ = overrides.tighten(load({**data, "mode": "strict"}), {})
    judgement = judge(spec, principal, policy, host, counts)
    assert judgement.allowed == (not judgement.violations)
    assert judgement.allowed == (judgement.outcome == "allow")


@settings(SETTINGS, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(spec=st.one_of(SPECS, LIKELY_ALLOWED), data=DOCUMENTS, principal=PRINCIPALS)
def test_an_allowed_enforced_spec_is_allowed_again_unchanged(host, spec, data, principal):
    policy, _ = overrides.tighten(load({**data, "mode": "strict"}), {})
    first = judge(spec, principal, policy, host, engine.Counts())
    assume(first.allowed)
    again = judge(first.enforced, principal, policy, host, engine.Counts())
    assert again.allowed
    assert again.enforced == first.enforced


@SETTINGS
@given(
    spec=st.one_of(SPECS, LIKELY_ALLOWED),
    data=DOCUMENTS,
    override=DOCUMENTS,
    principal=PRINCIPALS,
    counts=COUNTS,
)
def test_a_session_override_never_loosens(host, spec, data, override, principal, counts):
    loaded = load(data)
    base, _ = overrides.tighten(loaded, {})
    tightened, _refused = overrides.tighten(loaded, override)
    before = judge(spec, principal, base, host, counts)
    after = judge(spec, principal, tightened, host, counts)
    if before.outcome == "deny":
        assert after.outcome == "deny"
    if before.violations:
        assert after.violations
    assert overrides.MODE_STRICTNESS[tightened.document.mode] >= overrides.MODE_STRICTNESS[base.document.mode]
    for name in ("cpus", "memory", "pids"):
        if getattr(spec.resources, name) == 0 and before.outcome != "disabled":
            assert getattr(after.enforced.resources, name) <= getattr(before.enforced.resources, name)


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=12,
)
SECTIONS = ["mode", "quotas", "mounts", "images", "network", "security", "labels", "nope"]


@SETTINGS
@given(override=st.dictionaries(st.sampled_from(SECTIONS), JSONISH | DOCUMENTS, max_size=4))
def test_malformed_documents_and_overrides_are_refused_never_a_crash(override):
    for attempt in (lambda: overrides.tighten(load({}), override), lambda: document.load(override, DEFAULTS)):
        try:
            attempt()
        except DocumentError as error:
            assert error.errors and all(isinstance(e.path, str) and e.message for e in error.errors)
