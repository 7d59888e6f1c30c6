"""The Docker runtime adapter against the real engine: hardening in effect, no client-side caps on waits
and followers, cancellation, error codes, events."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import pytest

from baaaht.bus.testing import Recorded, wait_for
from baaaht.schemas.config import Config, DockerConfig, RuntimeConfig
from baaaht.schemas.containers import ContainerLogs, ContainerSpec, Healthcheck, Mount, Resources
from baaaht.services.containers.docker_runtime import DockerRuntime
from baaaht.services.containers.runtime import (
    Conflict,
    EngineError,
    EngineUnavailable,
    Invalid,
    NotFound,
    WrongState,
)
from tests import container_support
from tests.container_fakes import hardened

docker_client, busybox, test_label = (
    container_support.docker_client,
    container_support.busybox,
    container_support.test_label,
)

pytestmark = pytest.mark.docker

MEMORY = 64 * 1024 * 1024


# Short calls (create, start, stop) take seconds when the machine is busy: they get the default timeout.
# Long calls must not care about it: the test of that uses a runtime with this one for them alone.
SHORT_TIMEOUT = 2.0  # its one short call, the version handshake, is quick even then


@pytest.fixture
def runtime():
    engine = DockerRuntime(Config())
    yield engine
    engine.close()


@pytest.fixture
def short_timeout_runtime():
    engine = DockerRuntime(Config(runtime=RuntimeConfig(timeout=SHORT_TIMEOUT)))
    yield engine
    engine.close()


def spec_for(image: str, labels: dict, script: str, **changes) -> ContainerSpec:
    spec = ContainerSpec(image=image, command=["sh", "-c", script], labels=labels, **changes)
    return hardened(spec, memory=MEMORY, cpus=0.5, pids=64)


def run_to_end(runtime: DockerRuntime, spec: ContainerSpec) -> tuple[int, list]:
    container, _ = runtime.create(spec)
    runtime.start(container)
    [result] = list(runtime.wait(container))
    lines = list(runtime.logs(container, ContainerLogs(id=container)))
    return result.exit_code, lines


def test_hardened_defaults_are_in_effect_inside_the_container(runtime, busybox, test_label):
    script = (
        "id -u; id -g; grep CapEff /proc/self/status; "
        "touch /probe 2>/dev/null && echo root-writable || echo root-read-only; "
        "touch /tmp/probe && echo tmp-writable; "
        "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '"
    )
    exit_code, lines = run_to_end(runtime, spec_for(busybox, test_label, script))
    out = [line.text for line in lines if line.stream == "stdout"]
    assert exit_code == 0
    assert out == ["1000", "1000", "CapEff:\t0000000000000000", "root-read-only", "tmp-writable", "lo"]


def test_limits_and_options_reach_the_engine(runtime, busybox, test_label, docker_client):
    spec = spec_for(busybox, test_label, "true", resources=Resources(pids=33))
    container, _ = runtime.create(spec)
    host = docker_client.api.inspect_container(container)["HostConfig"]
    assert host["PidsLimit"] == 33 and host["Memory"] == MEMORY and host["NanoCpus"] == 500_000_000
    assert host["ReadonlyRootfs"] and host["Init"] and host["CapDrop"] == ["ALL"]
    assert host["SecurityOpt"] == ["no-new-privileges:true"] and host["NetworkMode"] == "none"


def test_wait_and_log_follow_outlive_the_client_timeout(runtime, short_timeout_runtime, busybox, test_label):
    # Both open for the container's 3 s, longer than the 2 s timeout, and still end with what it did.
    container, _ = runtime.create(spec_for(busybox, test_label, "echo start; sleep 3; echo end >&2; exit 7"))
    runtime.start(container)
    waiter = short_timeout_runtime.wait(container)
    lines = list(short_timeout_runtime.logs(container, ContainerLogs(id=container, follow=True)))
    assert [(line.stream, line.text) for line in lines] == [("stdout", "start"), ("stderr", "end")]
    [result] = list(waiter)
    assert result.exit_code == 7


def test_closing_a_stream_ends_it_at_once(runtime, busybox, test_label):
    container, _ = runtime.create(spec_for(busybox, test_label, "echo ready; sleep 600"))
    runtime.start(container)
    follower = runtime.logs(container, ContainerLogs(id=container, follow=True, timestamps=True))
    waiter = runtime.wait(container)
    stats = runtime.stats_stream(container)
    lines = []

    def follow() -> None:
        for line in follower:
            lines.append(line)

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        followed = pool.submit(follow)
        waited = pool.submit(list, waiter)
        sampled = pool.submit(list, stats)
        # The follower blocks once it has the one line there is (closed earlier, it would have none).
        wait_for(lambda: lines and waited.running(), what="the first line and the wait to block")
        for stream in (follower, waiter, stats):
            stream.close()
        followed.result(timeout=10)
        assert [line.text for line in lines] == ["ready"] and lines[0].time.startswith("20")
        assert waited.result(timeout=10) == []
        sampled.result(timeout=10)


def test_a_stream_left_after_the_line_it_wanted_is_closed_by_close(runtime, busybox, test_label):
    # As tests/agent_support.py's AgentLog does: read up to a line, stop, close. Left open, its engine
    # socket is found by the garbage collector later (ResourceWarning), failing whichever test runs then.
    container, _ = runtime.create(spec_for(busybox, test_label, "echo ready; sleep 600"))
    runtime.start(container)
    follower = runtime.logs(container, ContainerLogs(id=container, follow=True))
    lines = iter(follower)
    assert next(lines).text == "ready"
    follower.close()
    assert follower._response.raw.closed  # closed now, not when the collector gets to it
    assert list(lines) == []


def test_stats_stream_ends_with_the_container(runtime, busybox, test_label):
    container, _ = runtime.create(spec_for(busybox, test_label, "sleep 2"))
    runtime.start(container)
    samples = list(runtime.stats_stream(container))
    assert samples and all(s.pids >= 1 and s.memory_limit == MEMORY for s in samples)
    one = runtime.stats(container)
    assert one.pids == 0  # stopped by now


def test_engine_errors_are_the_runtimes_own_kinds(runtime, busybox, test_label):
    spec = spec_for(busybox, test_label, "sleep 60", name=f"baaaht-test-{test_label['baaaht.test'][:12]}")
    container, _ = runtime.create(spec)
    cases = [
        (lambda: runtime.create(spec), Conflict),
        (lambda: runtime.inspect("no-such-container"), NotFound),
        (lambda: runtime.create(spec_for("baaaht-test/missing:1", test_label, "true")), NotFound),
        (lambda: runtime.pause(container), WrongState),
        (lambda: runtime.unpause(container), WrongState),
        (lambda: runtime.kill(container, "SIGKILL"), WrongState),
        (lambda: list(runtime.wait("no-such-container")), NotFound),
        (lambda: list(runtime.pull("localhost:1/nothing:1")), EngineUnavailable),
        (lambda: runtime.inspect_volume("baaaht-test-no-such-volume"), NotFound),
    ]
    for call, kind in cases:
        with pytest.raises(EngineError) as caught:
            call()
        assert type(caught.value) is kind, caught.value
    runtime.start(container)
    with pytest.raises(Invalid):
        runtime.kill(container, "SIGNOPE")
    with pytest.raises(WrongState):
        runtime.remove(container, force=False, volumes=False)


def test_volumes_are_made_listed_and_removed_by_label(runtime, busybox, test_label, docker_client):
    name = f"baaaht-test-{test_label['baaaht.test']}"
    try:
        made = runtime.create_volume(name, {**test_label, "baaaht.session": "s1"})
        assert made.name == name and made.session_id == "s1" and made.created > time.time() - 60
        # The engine returns an existing volume as it is, whatever labels the second create asks for.
        assert runtime.create_volume(name, {"other": "x"}).labels == made.labels
        assert [v.name for v in runtime.list_volumes(test_label)] == [name]
        mount = Mount(type="volume", source=name, target="/data")
        container, _ = runtime.create(spec_for(busybox, test_label, "true", mounts=[mount]))
        with pytest.raises(WrongState):
            runtime.remove_volume(name)  # in use
        runtime.remove(container, force=True, volumes=False)
        runtime.remove_volume(name)
        assert runtime.list_volumes(test_label) == []
    finally:
        container_support.remove_volume(docker_client, name)


def test_pause_unpause_restart_and_stop_with_init_are_quick(runtime, busybox, test_label):
    container, _ = runtime.create(spec_for(busybox, test_label, "sleep 600"))
    runtime.start(container)
    runtime.pause(container)
    assert runtime.inspect(container).state == "paused"
    runtime.unpause(container)
    runtime.restart(container, timeout=30)
    assert runtime.inspect(container).state == "running"
    runtime.stop(container, timeout=30)  # the init process forwards SIGTERM: no 30 s wait-out
    info = runtime.inspect(container)
    assert info.state == "exited" and info.exit_code == 143 and info.finished_at
    runtime.remove(container, force=False, volumes=True)
    assert runtime.list(test_label) == []


def test_health_follows_the_healthcheck(runtime, busybox, test_label):
    check = Healthcheck(test=["CMD-SHELL", "test -e /tmp/ready"], interval=0.2, timeout=1, retries=2)
    container, _ = runtime.create(
        spec_for(busybox, test_label, "touch /tmp/ready; sleep 600", healthcheck=check)
    )
    runtime.start(container)
    report = wait_for(
        lambda: (r := runtime.health(container)).status == "healthy" and r,
        what="the container to become healthy",
    )
    assert report.has_healthcheck and report.state == "running"


def test_listing_filters_by_label(runtime, busybox, test_label):
    made = {runtime.create(spec_for(busybox, {**test_label, "n": str(i)}, "true"))[0] for i in range(3)}
    assert {c.id for c in runtime.list(test_label)} == made
    [only] = runtime.list({**test_label, "n": "1"})
    assert only.state == "created" and only.labels["n"] == "1" and only.created > 0


def test_events_report_a_container_killed_behind_our_back(runtime, busybox, test_label, docker_client):
    events = runtime.events(time.time() - 1)
    seen: Recorded = Recorded()

    def read() -> None:
        for event in events:
            if event.kind == "container":
                seen.append(event)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        container, _ = runtime.create(spec_for(busybox, test_label, "sleep 600"))
        runtime.start(container)
        docker_client.api.kill(container)  # not through the runtime
        seen.wait_until(
            lambda got: any(e.id == container and e.action == "die" for e in got),
            what="the die event for the kill",
        )
    finally:
        events.close()
        reader.join(10)
    die = next(e for e in seen if e.id == container and e.action == "die")
    assert die.attributes["exitCode"] == "137" and die.attributes["baaaht.test"] == test_label["baaaht.test"]
    assert [e.action for e in seen if e.id == container][:2] == ["create", "start"]


def test_an_absent_engine_is_unavailable_at_once():
    absent = DockerRuntime(Config(docker=DockerConfig(host="unix:///tmp/baaaht-no-docker.sock")))
    for call in (absent.ping, lambda: absent.list({}), lambda: absent.inspect("x")):
        with pytest.raises(EngineUnavailable) as caught:
            call()
        assert "baaaht-no-docker.sock" in caught.value.message
