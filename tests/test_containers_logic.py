"""Pure logic of the container manager: hardening, validation, reconcile decisions, event translation,
engine-answer conversion, TLS settings, the installation id and runtime selection."""

from __future__ import annotations

import os
import struct

import docker
import msgspec
import pytest

from baaaht.bus.errors import BusError
from baaaht.schemas.config import Config, DockerConfig, RuntimeConfig
from baaaht.schemas.containers import (
    ContainerDied,
    ContainerHealthChanged,
    ContainerLogs,
    ContainerSpec,
    ContainerStarted,
    ContainerSummary,
    Healthcheck,
    ImagePulled,
    Mount,
    Resources,
)
from baaaht.schemas.errors import ErrorCode
from baaaht.schemas.policy import Decision, Violation
from baaaht.services.containers import install, reconcile, session_scope, validation
from baaaht.services.containers.apple import AppleRuntime
from baaaht.services.containers.docker_runtime import DockerRuntime
from baaaht.services.containers.docker_runtime.connection import tls_config
from baaaht.services.containers.docker_runtime.inspection import health_report
from baaaht.services.containers.docker_runtime.logs import LogDemuxer, demux_frames
from baaaht.services.containers.docker_runtime.spec import create_args
from baaaht.services.containers.docker_runtime.stats import sample_is_live, stats_sample
from baaaht.services.containers.events import EventTranslator
from baaaht.services.containers.hardening import (
    BUS_ENV,
    HEARTBEAT_ENV,
    AgentBus,
    Identity,
    attach_identity,
    unique_name,
)
from baaaht.services.containers.ownership import (
    LABEL_AGENT_BUS,
    LABEL_INSTALL,
    LABEL_MANAGED,
    LABEL_OWNER,
    LABEL_ROLE,
    LABEL_SESSION,
)
from baaaht.services.containers.peers import enforced_or_denied
from baaaht.services.containers.runtime import (
    RuntimeConfigError,
    RuntimeUnavailable,
    runtime_factories,
    select_runtime,
)
from tests.container_fakes import engine_event, hardened, replace, session_info

MEMORY = 256 * 1024 * 1024


def harden(spec: ContainerSpec) -> ContainerSpec:
    return hardened(spec, memory=MEMORY, cpus=1.5, pids=128)


INSTALL = "a" * 32
OURS = {LABEL_MANAGED: "true", LABEL_INSTALL: INSTALL}


# -- the orchestrator's own additions ---------------------------------------------------------------


def test_attach_identity_sets_authoritative_labels_unique_names_and_the_bus():
    spec = ContainerSpec(image="i", labels={"app": "x", LABEL_SESSION: "spoofed"})
    bus = AgentBus(
        host_dir="/run/b/agent", container_dir="/run/baaaht/agent", gid=4321, heartbeat_interval=0.2
    )
    done = attach_identity(spec, Identity(INSTALL, "s1", "agent"), bus)
    assert done.labels == {
        "app": "x",
        LABEL_MANAGED: "true",
        LABEL_INSTALL: INSTALL,
        LABEL_OWNER: "session",
        LABEL_SESSION: "s1",
        LABEL_ROLE: "agent",
        LABEL_AGENT_BUS: "true",
    }
    assert done.name.startswith("baaaht-agent-s1-")
    assert done.mounts == [
        Mount(type="bind", source="/run/b/agent", target="/run/baaaht/agent", read_only=True)
    ]
    assert done.group_add == ["4321"]
    assert done.env[BUS_ENV] == "ipc:///run/baaaht/agent/bus.sock"
    assert done.env[HEARTBEAT_ENV] == "0.2s"  # the host's: the broker drops an agent that beats slower
    again = attach_identity(spec, Identity(INSTALL, "s1", "agent"), None)
    assert again.name != done.name and again.mounts == [] and BUS_ENV not in again.env
    assert LABEL_AGENT_BUS not in again.labels


def test_unique_names_are_valid_engine_names():
    name = unique_name("agent", "weird/session id!")
    assert msgspec.convert({"image": "i", "name": name}, ContainerSpec).name == name  # the schema's rule
    assert len({unique_name("a", "b") for _ in range(50)}) == 50


# -- validation --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"mounts": [Mount(type="volume", source="../info", target="/x")]}, "spec.mounts[0].source"),
        ({"labels": {"baaaht.install": "x"}}, "spec.labels"),
        ({"env": {"A=B": "1"}}, "spec.env"),
        ({"mounts": [Mount(type="bind", source="relative", target="/x")]}, "spec.mounts[0].source"),
        ({"mounts": [Mount(type="tmpfs", target="tmp")]}, "spec.mounts[0].target"),
        (
            {"mounts": [Mount(type="tmpfs", target="/a"), Mount(type="tmpfs", target="/a/")]},
            "spec.mounts[1].target",
        ),
        ({"mounts": [Mount(type="volume", target="/a", tmpfs_size=5)]}, "spec.mounts[0].tmpfs_size"),
        ({"mounts": [Mount(type="volume", source="a/b", target="/a")]}, "spec.mounts[0].source"),
        ({"healthcheck": Healthcheck(test=["CMD"])}, "spec.healthcheck.test"),
        ({"resources": Resources(memory=1000)}, "spec.resources.memory"),
        ({"remove_on_stop": True, "restart_policy": "always"}, "spec.restart_policy"),
        ({"restart_max_retries": 3}, "spec.restart_max_retries"),
        ({"healthcheck": Healthcheck(test=["true"])}, "spec.healthcheck.test"),
        ({"networks": [""]}, "spec.networks"),
    ],
)
def test_invalid_specs_are_refused_naming_the_field(changes, field):
    # The rules that span fields or a type cannot say; one-field rules: tests/test_schema_constraints.py
    with pytest.raises(BusError) as caught:
        validation.validate_spec(replace(ContainerSpec(image="img:1"), **changes))
    assert caught.value.code is ErrorCode.INVALID_ARGUMENT
    assert caught.value.details["field"] == field and field in caught.value.message


def test_logs_need_a_stream():
    with pytest.raises(BusError, match="stdout"):
        validation.validate_logs(ContainerLogs(id="x", stdout=False, stderr=False))


# -- reconcile decisions -----------------------------------------------------------------------------


def summary(labels: dict[str, str], created: float = 0.0) -> ContainerSummary:
    return ContainerSummary(
        id=f"id-{len(labels)}-{created}", name="n", image="i", state="running", labels=labels, created=created
    )


def test_reconcile_removes_orphans_of_this_install_only():
    now = 1000.0
    closed = summary({**OURS, LABEL_SESSION: "closed"}, created=0)
    gone = summary({**OURS, LABEL_SESSION: "gone"}, created=1)
    unlabelled = summary(dict(OURS), created=2)
    alive = summary({**OURS, LABEL_SESSION: "open"}, created=3)
    fresh = summary({**OURS, LABEL_SESSION: "gone"}, created=now - 5)
    foreign = summary({LABEL_MANAGED: "true", LABEL_INSTALL: "b" * 32, LABEL_SESSION: "gone"}, created=4)
    unmanaged = summary({LABEL_SESSION: "gone"}, created=5)
    containers = [closed, gone, unlabelled, alive, fresh, foreign, unmanaged]
    assert reconcile.sessions_to_check(containers, INSTALL, now, grace=30) == {"closed", "gone", "open"}
    verdicts = {"closed": "closed", "gone": "missing", "open": "open"}
    result = reconcile.plan(containers, INSTALL, verdicts, now, grace=30)
    assert [r.target for r in result.remove] == [closed, gone, unlabelled]
    assert "closed" in result.remove[0].reason and "does not exist" in result.remove[1].reason
    assert (result.kept, result.too_young, result.foreign) == (1, 1, 2)


def test_reconcile_keeps_a_container_whose_session_has_no_verdict():
    container = summary({**OURS, LABEL_SESSION: "unknown"})
    assert reconcile.plan([container], INSTALL, {}, now=100.0, grace=0).remove == []


# -- events --------------------------------------------------------------------------------------------


def test_engine_events_become_bus_events_for_this_install_only():
    translator = EventTranslator(INSTALL)
    labels = {**OURS, LABEL_SESSION: "s1", LABEL_ROLE: "agent"}
    started = translator.translate(engine_event("start", "c1", labels, name="n1", image="img"))
    assert isinstance(started, ContainerStarted)
    assert (started.container_id, started.session_id, started.role, started.name) == (
        "c1",
        "s1",
        "agent",
        "n1",
    )
    assert translator.translate(engine_event("oom", "c1", labels)) is None
    died = translator.translate(engine_event("die", "c1", labels, exitCode="137"))
    assert isinstance(died, ContainerDied) and died.exit_code == 137 and died.oom_killed
    died_again = translator.translate(engine_event("die", "c1", labels, exitCode="0"))
    assert died_again.exit_code == 0 and not died_again.oom_killed
    health = translator.translate(engine_event("health_status: healthy", "c1", labels))
    assert isinstance(health, ContainerHealthChanged) and health.status == "healthy"
    assert translator.translate(engine_event("exec_start: sh", "c1", labels)) is None
    foreign = {**labels, LABEL_INSTALL: "b" * 32}
    assert translator.translate(engine_event("start", "c2", foreign)) is None
    assert translator.translate(engine_event("start", "c3", {})) is None


def test_image_pull_events_are_published():
    from baaaht.services.containers.runtime import EngineEvent

    event = EventTranslator(INSTALL).translate(EngineEvent(kind="image", action="pull", id="img:1", time=5.0))
    assert event == ImagePulled(image="img:1", time=5.0)


# -- engine answers ------------------------------------------------------------------------------------


def test_create_args_carry_a_pids_limit_alone_and_every_hardening_field():
    spec = harden(ContainerSpec(image="i", command=["sh", "-c"], args=["echo hi"]))
    spec = replace(
        spec, resources=Resources(pids=7), healthcheck=Healthcheck(test=["CMD", "true"], interval=2)
    )
    args = create_args(spec, "1.41")
    host = args["host_config"]
    assert host["PidsLimit"] == 7 and "Memory" not in host and "NanoCpus" not in host
    assert args["command"] == ["sh", "-c", "echo hi"]
    assert host["ReadonlyRootfs"] and host["Init"] and host["CapDrop"] == ["ALL"]
    assert host["SecurityOpt"] == ["no-new-privileges:true"] and host["NetworkMode"] == "none"
    assert host["Mounts"][0]["Type"] == "tmpfs" and host["Mounts"][0]["Target"] == "/tmp"
    assert args["user"] == "1000:1000" and args["healthcheck"]["Interval"] == 2_000_000_000
    limits = create_args(harden(ContainerSpec(image="i")), "1.41")["host_config"]
    assert limits["NanoCpus"] == 1_500_000_000 and limits["Memory"] == MEMORY


def test_health_without_a_healthcheck_is_derived_from_the_state():
    assert health_report({"State": {"Status": "running"}}).status == "healthy"
    assert health_report({"State": {"Status": "exited", "ExitCode": 1}}).status == "unhealthy"
    assert (
        health_report({"State": {"Status": "exited", "OOMKilled": True, "ExitCode": 0}}).status == "unhealthy"
    )
    assert health_report({"State": {"Status": "exited", "ExitCode": 0}}).status == "unknown"
    checked = health_report(
        {
            "State": {
                "Status": "running",
                "Health": {"Status": "starting", "FailingStreak": 2, "Log": [{"Output": "no\n"}]},
            }
        }
    )
    assert (checked.status, checked.failing_streak, checked.last_output, checked.has_healthcheck) == (
        "starting",
        2,
        "no",
        True,
    )
    stopped = health_report({"State": {"Status": "exited", "Health": {"Status": "healthy"}}})
    assert stopped.status == "unhealthy"


def test_stats_sample_computes_docker_style_figures():
    raw = {
        "read": "2026-01-01T00:00:00Z",
        "cpu_stats": {"cpu_usage": {"total_usage": 300}, "system_cpu_usage": 2000, "online_cpus": 2},
        "precpu_stats": {"cpu_usage": {"total_usage": 100}, "system_cpu_usage": 1000},
        "memory_stats": {"usage": 1000, "limit": 4000, "stats": {"total_inactive_file": 200}},
        "networks": {"eth0": {"rx_bytes": 5, "tx_bytes": 7}, "eth1": {"rx_bytes": 1, "tx_bytes": 1}},
        "blkio_stats": {
            "io_service_bytes_recursive": [{"op": "Read", "value": 10}, {"op": "Write", "value": 20}]
        },
        "pids_stats": {"current": 3},
    }
    sample = stats_sample(raw, now=1.0)
    assert sample.cpu_percent == 40.0
    assert (sample.memory_usage, sample.memory_limit, sample.memory_percent) == (800, 4000, 20.0)
    assert (sample.net_rx, sample.net_tx, sample.block_read, sample.block_write, sample.pids) == (
        6,
        8,
        10,
        20,
        3,
    )
    assert sample_is_live(raw) and not sample_is_live({"read": "0001-01-01T00:00:00Z"})


def frame(stream: int, data: bytes) -> bytes:
    return struct.pack(">BxxxL", stream, len(data)) + data


def test_log_frames_become_lines_even_when_split_across_frames_and_reads():
    payload = frame(1, b"hel") + frame(2, b"oops\n") + frame(1, b"lo\nwor") + frame(1, b"ld")
    chunks = iter([payload[i : i + 3] for i in range(0, len(payload), 3)])  # short reads, like a socket
    buffer = bytearray()

    def read(size: int) -> bytes:
        while len(buffer) < size:
            chunk = next(chunks, b"")
            if not chunk:
                break
            buffer.extend(chunk)
        out = bytes(buffer[:size])
        del buffer[:size]
        return out

    demuxer = LogDemuxer(timestamps=False)
    lines = [line for stream, data in demux_frames(read) for line in demuxer.feed(stream, data)]
    lines += demuxer.flush()
    assert [(line.stream, line.text) for line in lines] == [
        ("stderr", "oops"),
        ("stdout", "hello"),
        ("stdout", "world"),
    ]


def test_log_timestamps_are_split_off():
    [line] = LogDemuxer(timestamps=True).feed("stdout", b"2026-01-01T00:00:00.5Z hello there\n")
    assert (line.time, line.text) == ("2026-01-01T00:00:00.5Z", "hello there")


# -- policy decisions ----------------------------------------------------------------------------------


def test_a_denial_names_the_rules():
    decision = Decision(
        decision_id="d1",
        allowed=False,
        outcome="deny",
        mode="strict",
        policy_version="v1",
        violations=[Violation(rule="security.root", message="runs as root", field="user")],
        enforced=ContainerSpec(image="i"),
    )
    with pytest.raises(BusError) as caught:
        enforced_or_denied(decision)
    assert caught.value.code is ErrorCode.PERMISSION_DENIED
    assert (
        caught.value.details["rules"] == ["security.root"] and "security.root (user)" in caught.value.message
    )
    allowed = replace(
        decision, allowed=True, outcome="allow", violations=[], enforced=ContainerSpec(image="j")
    )
    assert enforced_or_denied(allowed).image == "j"


# -- session settings as policy overrides -------------------------------------------------------------


@pytest.mark.parametrize(
    "settings, override",
    [
        ({}, {}),
        ({"policy_override": {"mode": "strict"}}, {"mode": "strict"}),
        ({"allowed_images": ["busybox:*"]}, {"images": {"allowed": ["busybox:*"]}}),
        (
            {"allowed_images": ["busybox:*"], "policy_override": {"images": None}},
            {"images": {"allowed": ["busybox:*"]}},
        ),
        (
            {"allowed_images": ["a:1"], "policy_override": {"images": {"allow_latest": False}}},
            {"images": {"allow_latest": False, "allowed": ["a:1"]}},
        ),
    ],
)
def test_a_sessions_allowed_images_become_its_image_allow_list(settings, override):
    assert session_scope.policy_override(session_info(**settings)) == override


@pytest.mark.parametrize("images", [{"allowed": ["other:*"]}, ["not", "a", "section"]])
def test_a_second_session_image_allow_list_is_never_dropped(images):
    info = session_info(allowed_images=["busybox:*"], policy_override={"images": images})
    with pytest.raises(BusError) as caught:
        session_scope.policy_override(info)
    assert (
        caught.value.code is ErrorCode.FAILED_PRECONDITION
        and "settings.allowed_images" in caught.value.message
    )


# -- TLS ----------------------------------------------------------------------------------------------


def test_tls_is_never_unverified(tmp_path):
    assert tls_config(DockerConfig(host="unix:///var/run/docker.sock")) is False
    with pytest.raises(RuntimeConfigError, match="skip certificate verification"):
        tls_config(DockerConfig(host="tcp://127.0.0.1:2376", tls_verify=False, tls_ca_cert="/ca.pem"))
    with pytest.raises(RuntimeConfigError, match="together"):
        tls_config(DockerConfig(host="tcp://127.0.0.1:2376", tls_cert="/c.pem"))
    with pytest.raises(RuntimeConfigError, match="tcp://"):
        tls_config(DockerConfig(host="unix:///x.sock", tls_ca_cert="/ca.pem"))
    verified = tls_config(DockerConfig(host="tcp://127.0.0.1:2376"))
    assert isinstance(verified, docker.tls.TLSConfig) and verified.verify is True
    ca = tmp_path / "ca.pem"
    ca.write_text("not really a certificate")
    assert tls_config(DockerConfig(host="tcp://127.0.0.1:2376", tls_ca_cert=str(ca))).verify == str(ca)
    with pytest.raises(RuntimeConfigError, match="docker TLS"):
        tls_config(DockerConfig(host="tcp://127.0.0.1:2376", tls_ca_cert=str(tmp_path / "missing.pem")))


# -- installation id ---------------------------------------------------------------------------------


def test_install_id_is_made_once_and_kept(tmp_path):
    first = install.load_or_create(str(tmp_path / "data"))
    assert install.VALID.match(first) and install.load_or_create(str(tmp_path / "data")) == first
    assert os.listdir(tmp_path / "data") == [install.FILE_NAME]


def test_a_corrupt_install_id_is_refused_not_replaced(tmp_path):
    (tmp_path / install.FILE_NAME).write_text("garbage\n")
    with pytest.raises(install.InstallIdError, match="32 hex digits"):
        install.load_or_create(str(tmp_path))
    assert (tmp_path / install.FILE_NAME).read_text() == "garbage\n"


# -- runtime selection -----------------------------------------------------------------------------------


def config_with(runtime_type: str) -> Config:
    return Config(runtime=RuntimeConfig(type=runtime_type))


def test_an_unknown_runtime_is_a_config_error_listing_the_known_ones():
    with pytest.raises(
        RuntimeConfigError, match=r"'podman' is not a known container runtime \(known: auto, apple"
    ):
        select_runtime(config_with("podman"))


def test_installed_and_builtin_runtimes_are_known():
    factories = runtime_factories()
    assert factories["docker"] is DockerRuntime and factories["apple"] is AppleRuntime


def test_apple_runtime_refuses_clearly_off_macos():
    with pytest.raises(RuntimeUnavailable, match="apple runtime is not supported on this host"):
        select_runtime(config_with("apple"))


def test_auto_picks_docker_on_linux_and_falls_back_from_apple_on_macos():
    picked = []

    def apple(config):
        picked.append("apple")
        raise RuntimeUnavailable("no container CLI")

    def docker_factory(config):
        picked.append("docker")
        return "docker-runtime"

    factories = {"apple": apple, "docker": docker_factory}
    assert select_runtime(config_with("auto"), platform="linux", factories=factories) == "docker-runtime"
    assert picked == ["docker"]
    assert select_runtime(config_with("auto"), platform="darwin", factories=factories) == "docker-runtime"
    assert picked == ["docker", "apple", "docker"]


def test_a_custom_runtime_is_chosen_by_name():
    factories = {"docker": DockerRuntime, "mine": lambda config: ("mine", config.runtime.type)}
    assert select_runtime(config_with("mine"), factories=factories) == ("mine", "mine")
