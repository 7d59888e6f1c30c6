"""The stock anthropic and openai SDKs, plain httpx and http.client through the egress proxy from inside
a real agent container (the image's own `llm` extra), identified the real way (the kernel's peer pid ->
its container's cgroup -> the identity file the container manager writes), the keys coming from a real
credential store; then the keys' bytes (and their base64) counted everywhere an agent or an operator
can look: 0. A control plants the key in each kind of place and the same scan finds it."""

from __future__ import annotations

import io
import json
import logging
import tarfile
import time
from pathlib import Path

import msgspec
import pytest

from baaaht.bus.testing import wait_for
from baaaht.common import socket_group
from baaaht.common.identity import AgentIdentity, IdentityStore
from baaaht.services.credentials.master import KeyFile
from baaaht.services.credentials.store import CredentialStore
from tests import container_support
from tests.egress_support import ANTHROPIC_KEY, OPENAI_KEY, running_egress, secret_forms

pytestmark = pytest.mark.docker
docker_client, test_label = container_support.docker_client, container_support.test_label

CLIENT = Path(__file__).parent / "egress_agent_client.py"
AGENT_MOUNT = "/run/baaaht/agent"
SOCKET = f"{AGENT_MOUNT}/egress.sock"
SESSION = "s-container"
EXPORT_READ = 1 << 20


def count(haystack: bytes, forms: list[bytes]) -> int:
    return sum(haystack.count(form) for form in forms)


def exported_count(container, forms: list[bytes]) -> int:
    """Occurrences in `docker export` of the container (its whole root filesystem), read as a stream
    with an overlap so a form split between two reads is still found."""
    overlap = max(len(form) for form in forms) - 1
    found, tail = 0, b""
    for chunk in container.export(chunk_size=EXPORT_READ):
        window = tail + chunk
        found += count(window, forms) - count(tail, forms)
        tail = window[-overlap:]
    return found


def inside_count(container, forms: list[bytes]) -> int:
    """Occurrences in what the agent could write (the tmpfs /tmp and /dev/shm: the root filesystem is
    read-only, the agents' directory holds only sockets), read from outside as one tar stream."""
    result = container.exec_run(["tar", "-c", "-f", "-", "/tmp", "/dev/shm"], user="0", demux=True)
    stdout, stderr = result.output
    assert result.exit_code == 0, stderr
    return count(stdout or b"", forms)


def container_counts(container, forms: list[bytes]) -> dict[str, int]:
    container.reload()
    image = container.client.images.get(container.attrs["Image"])
    return {
        "container env and docker inspect": count(json.dumps(container.attrs).encode(), forms),
        "image inspect": count(json.dumps(image.attrs).encode(), forms),
        "container logs": count(container.logs(), forms),
        "docker export": exported_count(container, forms),
        "container tmpfs": inside_count(container, forms),
    }


def agent_run(container, *args: str) -> dict:
    """The client run inside the container, as the agent user; its output also stays in its /tmp."""
    result = container.exec_run(
        ["sh", "-c", f"python3 /egress/client.py {SOCKET} {' '.join(args)} | tee -a /tmp/seen.jsonl"],
        user="1000:1000",
        demux=True,
    )
    stdout, stderr = result.output
    assert result.exit_code == 0, (stdout, stderr)
    return json.loads(stdout)


def agent_container(docker_client, agent_image, run_dir: Path, gid: int, labels: dict, **overrides):
    settings = dict(
        command=["sleep", "600"],
        volumes={
            str(run_dir / "agent"): {"bind": AGENT_MOUNT, "mode": "ro"},
            str(CLIENT): {"bind": "/egress/client.py", "mode": "ro"},
        },
        network_mode="none",
        user="1000:1000",
        group_add=[str(gid)],
        read_only=True,
        tmpfs={"/tmp": "size=64m"},
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        labels=labels,
    )
    return docker_client.containers.create(agent_image, **{**settings, **overrides})


@pytest.fixture
def store(tmp_path):
    opened = CredentialStore.open(str(tmp_path / "data"), KeyFile(str(tmp_path / "keys" / "master.key")))
    opened.put("anthropic", "api_key", ANTHROPIC_KEY, "", 0.0)
    opened.put("openai", "api_key", OPENAI_KEY, "", 0.0)
    yield opened
    opened.close()


def test_the_sdks_in_an_agent_container_reach_the_upstream_and_the_key_is_found_nowhere(
    tmp_path, agent_image, docker_client, test_label, store, caplog
):
    caplog.set_level(logging.DEBUG, logger="baaaht")
    forms = secret_forms([ANTHROPIC_KEY, OPENAI_KEY])
    gid = socket_group.ensure_gid(socket_group.DEFAULT_SOCKET_GROUP)
    with running_egress(tmp_path, agent_gid=gid, secrets=store) as egress:
        run_dir = egress.run_dir
        container = agent_container(docker_client, agent_image, run_dir, gid, test_label)
        IdentityStore(str(run_dir)).put(  # as the container manager does, before the start
            AgentIdentity(
                container_id=container.id,
                session_id=SESSION,
                role="agent",
                install_id="test",
                issued_at=time.time(),
            )
        )
        container.start()
        found = agent_run(container)
        reply = egress.upstream.reply
        for api in ("anthropic", "anthropic_stream", "openai", "openai_stream"):
            assert found[api] == {"text": reply, "output_tokens": len(reply.split(" "))}, api
        assert found["httpx_stream"] == found["http_client"] == {"status": 200, "text": reply}
        assert found["refused"]["body"]["error"]["refused"] == "method"
        # the key reached the upstream on every call, as the route injects it
        seen = [
            r.headers.get("x-api-key") or r.headers.get("authorization") for r in egress.upstream.requests
        ]
        anthropic_key, openai_key = ANTHROPIC_KEY.decode(), f"Bearer {OPENAI_KEY.decode()}"
        assert seen == [anthropic_key] * 2 + [openai_key] * 2 + [anthropic_key] * 2

        egress.upstream.reject_key = True  # it now answers 401 quoting the key it got
        errors = agent_run(container, "rejected")
        assert errors["anthropic"]["status"] == errors["httpx"]["status"] == 401
        assert "[redacted by the egress proxy]" in errors["anthropic"]["error"]
        assert len(egress.upstream.requests) == 8

        egress.server.journal.close()
        audit = (egress.data_dir / "audit" / "egress.jsonl").read_bytes()
        assert audit.count(container.id.encode()) == 9 and SESSION.encode() in audit  # 8 calls, 1 refusal
        store_files = sorted((tmp_path / "data" / "credentials").iterdir())
        places = {
            "events": count(msgspec.json.encode([p.event for p in egress.events.published]), forms),
            "audit chain": count(audit, forms),
            "error replies": count(json.dumps([found["refused"], errors]).encode(), forms),
            "proxy and store logs": count(
                "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records).encode(), forms
            ),
            "store files": count(b"".join(path.read_bytes() for path in store_files), forms),
            **container_counts(container, forms),
        }
        assert places == dict.fromkeys(places, 0), places
        # the read-only root filesystem changed only where the engine made the mount points
        mount_points = {"/egress", "/egress/client.py", "/run", "/run/baaaht", AGENT_MOUNT}
        assert {change["Path"] for change in container.diff()} <= mount_points
        assert b"[redacted by the egress proxy]" in container.exec_run(["cat", "/tmp/seen.jsonl"]).output


def test_the_scan_finds_a_key_planted_in_each_place(docker_client, agent_image, tmp_path, test_label):
    """The control: the same counts on a container given the key in its environment, which prints it,
    writes it to its root filesystem and to its tmpfs."""
    forms = secret_forms([ANTHROPIC_KEY])
    (tmp_path / "run" / "agent").mkdir(parents=True)
    container = agent_container(
        docker_client,
        agent_image,
        tmp_path / "run",
        0,
        test_label,
        command=["sh", "-c", 'echo "$PLANTED"; echo "$PLANTED" > /tmp/planted; exec sleep 600'],
        environment={"PLANTED": ANTHROPIC_KEY.decode()},
        read_only=False,
        user="0:0",
    )
    container.start()
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        entry = tarfile.TarInfo("planted-in-the-rootfs")
        entry.size = len(ANTHROPIC_KEY)
        tar.addfile(entry, io.BytesIO(ANTHROPIC_KEY))
    assert container.put_archive("/var/tmp", archive.getvalue())
    wait_for(lambda: b"\n" in container.logs(), timeout=30, what="the planted key to be printed")
    counts = container_counts(container, forms)
    assert counts["container env and docker inspect"] >= 1 and counts["container logs"] == 1
    assert counts["docker export"] == 1 and counts["container tmpfs"] == 1
    assert counts["image inspect"] == 0
