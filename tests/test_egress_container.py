"""The stock anthropic and openai SDKs through the egress proxy from inside a real agent container,
identified the real way (the kernel's peer pid -> its container's cgroup -> the identity file the
container manager writes), and the secret's bytes found nowhere afterwards."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import msgspec
import pytest

from baaaht.bus.testing import wait_for
from baaaht.common import socket_group
from baaaht.common.identity import AgentIdentity, IdentityStore
from tests import container_support
from tests.egress_support import running_egress

pytestmark = pytest.mark.docker
docker_client, test_label = container_support.docker_client, container_support.test_label

CLIENT = Path(__file__).parent / "egress_agent_client.py"
AGENT_MOUNT = "/run/baaaht/agent"
DONE = "egress client done"


def finished(container) -> str | None:
    """The container's output once the client is done (or the container ended), else None."""
    container.reload()
    output = container.logs().decode()
    return output if DONE in output or container.status != "running" else None


def secret_counts(haystack: bytes, secrets: list[bytes]) -> int:
    return sum(haystack.count(secret) for secret in secrets)


def test_the_sdks_in_an_agent_container_reach_the_upstream_and_the_key_appears_nowhere(
    tmp_path,
    agent_image,
    docker_client,
    test_label,
    caplog,
):
    caplog.set_level(logging.DEBUG, logger="baaaht")
    gid = socket_group.ensure_gid(socket_group.DEFAULT_SOCKET_GROUP)
    with running_egress(tmp_path, agent_gid=gid) as egress:
        run_dir = tmp_path / "run"
        container = docker_client.containers.create(
            agent_image,
            command=[
                "sh",
                "-c",
                f"python3 /egress/client.py {AGENT_MOUNT}/egress.sock && echo '{DONE}' && exec sleep 600",
            ],
            volumes={
                str(run_dir / "agent"): {"bind": AGENT_MOUNT, "mode": "ro"},
                str(CLIENT): {"bind": "/egress/client.py", "mode": "ro"},
            },
            network_mode="none",
            user="1000:1000",
            group_add=[str(gid)],
            read_only=True,
            tmpfs={"/tmp": "size=64m"},
            labels=test_label,
        )
        IdentityStore(str(run_dir)).put(  # as the container manager does, before the start
            AgentIdentity(
                container_id=container.id,
                session_id="s-container",
                role="agent",
                install_id="test",
                issued_at=time.time(),
            )
        )
        container.start()
        logs = wait_for(
            lambda: finished(container), timeout=120, what="the client in the container to finish"
        )
        assert DONE in logs, logs
        found = json.loads(logs.splitlines()[0])
        reply = egress.upstream.reply
        for api in ("anthropic", "anthropic_stream", "openai", "openai_stream"):
            assert found[api] == {"text": reply, "output_tokens": len(reply.split(" "))}, api
        assert found["refused"]["body"]["error"]["refused"] == "method"
        secrets = egress.secret_forms()
        seen = [
            r.headers.get("x-api-key") or r.headers.get("authorization") for r in egress.upstream.requests
        ]
        assert len(seen) == 4 and all(secret_counts(value.encode(), secrets) == 1 for value in seen)

        egress.server.journal.close()
        audit = (egress.data_dir / "audit" / "egress.jsonl").read_bytes()
        assert audit.count(container.id.encode()) == 5 and b"s-container" in audit
        container.reload()
        places = {
            "container env and inspect": json.dumps(container.attrs).encode(),
            "container logs": container.logs(),
            "events": msgspec.json.encode([p.event for p in egress.events.published]),
            "audit log": audit,
            "error replies": json.dumps(found["refused"]).encode(),
            "proxy logs": "\n".join(
                f"{record.getMessage()} {record.__dict__}" for record in caplog.records
            ).encode(),
            "agent filesystem": writable_places(container),
        }
        counts = {place: secret_counts(text, secrets) for place, text in places.items()}
        assert counts == dict.fromkeys(places, 0), counts
        assert not container.diff(), "the agent wrote to its read-only root filesystem"


def writable_places(container) -> bytes:
    """Everything an agent could have written: its tmpfs /tmp and /dev/shm (the root filesystem is
    read-only, the image was built before the secret existed, and the agents' directory holds only
    sockets), as one tar stream read from outside, so no secret is ever handed into the container."""
    result = container.exec_run(["tar", "-c", "-f", "-", "/tmp", "/dev/shm"], user="0", demux=True)
    stdout, stderr = result.output
    assert result.exit_code == 0, stderr
    return stdout
