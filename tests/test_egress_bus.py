"""The egress proxy as the credential service runs it: its own process on a real broker, the socket in
the agents' directory, callers found the real way (a host process has no container: refused), its
refusals audited and published, and `baaaht-ctl credentials usage`."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import httpx
import orjson

from baaaht.bus.testing import next_event
from baaaht.common import audit_chain
from baaaht.schemas.base import topic_of
from baaaht.schemas.egress import EgressAuditRecord, EgressRefused
from baaaht.services.credentials.egress.journal import audit_path
from tests import ctl_runner

ROUTES = [
    {
        "name": "anthropic",
        "upstream": "https://127.0.0.1:9",
        "credential": "anthropic",
        "paths": ["/v1/messages"],
        "roles": ["agent"],
    }
]


def test_the_credential_service_serves_the_proxy_on_the_agents_socket(make_host):
    host = make_host({"egress": {"routes": ROUTES}})
    socket_path = Path(host.run_dir) / "agent" / "egress.sock"
    with host.client().subscribe([topic_of(EgressRefused)]) as refusals:
        host.start_service("baaaht.services.credentials", "credential")
        mode = os.stat(socket_path)
        assert stat.S_ISSOCK(mode.st_mode) and stat.S_IMODE(mode.st_mode) == 0o660
        assert mode.st_gid == os.stat(socket_path.parent).st_gid != 0
        transport = httpx.HTTPTransport(uds=str(socket_path))
        with httpx.Client(transport=transport, base_url="http://egress") as client:
            reply = client.post("/anthropic/v1/messages", json={}, headers={"x-api-key": "mine"})
        assert reply.status_code == 403 and reply.json()["error"]["refused"] == "identity"
        event = next_event(refusals).event
        assert (event.refused, event.path, event.session_id) == ("identity", "/anthropic/v1/messages", "")
    usage = subprocess.run(
        [ctl_runner.CTL, *ctl_runner.host_args(host), "credentials", "usage", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert usage.returncode == 0 and orjson.loads(usage.stdout) == [], usage.stderr
    host.kill("credential", 15)  # SIGTERM: the proxy stops, its journal is written, its socket removed
    assert not socket_path.exists()
    path = audit_path(host.config.data_dir)
    assert audit_chain.verify(path).ok
    (record,) = audit_chain.read_tail(path, 10, 0, EgressAuditRecord)[0]
    assert (record.refused, record.status, record.route) == ("identity", 403, "")
