"""CURVE on tcp:// with a real broker: only issued, unexpired, unrevoked keys get in, each refusal is a
clear error within the call's timeout, counted and published as bus.auth.failed; a good key's role and
session are stamped into its Caller."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import msgspec
import pytest

from baaaht.bus import curve
from baaaht.bus.client import BusClient
from baaaht.bus.connection import Connection
from baaaht.bus.errors import BusError
from baaaht.bus.testing.waits import next_event, wait_for
from baaaht.common.config import load_config
from baaaht.schemas.base import topic_of
from baaaht.schemas.bus import (
    BusAuthFailed,
    BusAuthKeysIssue,
    BusAuthKeysList,
    BusAuthKeysRevoke,
    BusPing,
    BusStats,
    Register,
)
from baaaht.schemas.errors import ErrorCode
from tests.conftest import ECHO_SERVICE
from tests.ctl_runner import invoke
from tests.services.echo import Say

TIMEOUT = 3.0  # each refused call must fail well within this: with the handshake's error, not a TIMEOUT


def free_ports(count: int = 3) -> int:
    """A first port of `count` consecutive free ones on loopback."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            first = probe.getsockname()[1]
        if first + count > 65535:
            continue
        try:
            held = []
            for port in range(first, first + count):
                s = socket.socket()
                held.append(s)
                s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise AssertionError("no three consecutive free ports on 127.0.0.1")


@pytest.fixture
def tcp_host(make_host):
    return make_host({"bus": {"tcp_enabled": True, "tcp_port": free_ports(), "tcp_handshake_timeout": "1s"}})


def key_file(host, name: str, role: str, session: str = "", ttl: float = 0.0, **changes) -> str:
    """Issue a key through the operator's (ipc) connection and write its holder's file."""
    public, secret = curve.new_key_pair()
    issued = host.client().call(
        BusAuthKeysIssue(name=name, public_key=public, role=role, session=session, ttl=ttl)
    )
    keys = curve.ClientKeyFile(
        name=name,
        role=role,
        session=session,
        public_key=public,
        secret_key=secret,
        server_public_key=issued.server_public_key,
    )
    return write_key_file(host, msgspec.structs.replace(keys, **changes))


def write_key_file(host, keys: curve.ClientKeyFile) -> str:
    path = host.tmp_path / f"{keys.name}.key"
    curve.write_private(path, curve.encode_json(keys))
    return str(path)


def remote_config(host, path: str) -> str:
    """A config as on another host: the broker's tcp address and the key file (the run directory is
    the host's own, but a client with a key file does not look there)."""
    raw = json.loads(host.config_path.read_text())
    raw["bus"]["tcp_key_file"] = path
    config_path = host.tmp_path / f"remote-{os.path.basename(path)}.json"
    config_path.write_text(json.dumps(raw))
    return str(config_path)


def remote_client(host, path: str) -> BusClient:
    """A client configured as on another host."""
    config, _ = load_config(remote_config(host, path), env={})
    client = BusClient.for_config(config, timeout=TIMEOUT)
    host.clients.append(client)
    return client


def refused(client: BusClient) -> BusError:
    started = time.monotonic()
    with pytest.raises(BusError) as caught:
        client.call(BusPing())
    assert time.monotonic() - started < TIMEOUT
    assert caught.value.code == ErrorCode.UNAUTHENTICATED, caught.value
    return caught.value


def failure(host, reason: str | tuple[str, ...], saying: str = "") -> BusAuthFailed:
    """The first bus.auth.failed of `reason` (or one of them) whose message contains `saying`."""
    reasons = (reason,) if isinstance(reason, str) else reason
    with host.client().subscribe([topic_of(BusAuthFailed)], since=0) as events:
        return next_event(
            events,
            lambda d: d.event.reason in reasons and saying in d.event.message,
            what=f"bus.auth.failed {reason} saying {saying!r}",
        ).event


def test_a_good_key_works_and_its_caller_carries_the_keys_role_and_session(tcp_host):
    agent = remote_client(tcp_host, key_file(tcp_host, "far-agent", "agent", session="s-1"))
    operator = remote_client(tcp_host, key_file(tcp_host, "far-operator", "operator"))

    caller = agent.call(BusPing()).caller
    assert (caller.socket, caller.role, caller.session, caller.key) == ("agents", "agent", "s-1", "far-agent")
    caller = operator.call(BusPing()).caller
    assert (caller.socket, caller.role, caller.session, caller.key) == (
        "services",
        "operator",
        "",
        "far-operator",
    )
    with pytest.raises(BusError) as caught:  # an agent key is an agent: no bus.* but bus.ping
        agent.call(BusStats())
    assert caught.value.code == ErrorCode.PERMISSION_DENIED


def test_a_host_peer_on_another_host_follows_events_over_curve(tcp_host):
    operator = remote_client(tcp_host, key_file(tcp_host, "far-watcher", "operator"))
    with operator.subscribe([topic_of(BusAuthFailed)]) as events:  # from now on: live, on the events socket
        stranger = BusClient(f"tcp://127.0.0.1:{tcp_host.config.bus.tcp_port}", timeout=TIMEOUT)
        tcp_host.clients.append(stranger)
        refused(stranger)
        assert next_event(events, what="a bus.auth.failed over tcp://").event.socket == "services"


def test_a_null_peer_is_refused_on_tcp_at_once(tcp_host):
    endpoint = tcp_host.config.bus.tcp_host, tcp_host.config.bus.tcp_port
    client = BusClient(f"tcp://{endpoint[0]}:{endpoint[1]}", timeout=TIMEOUT)
    tcp_host.clients.append(client)
    assert "NULL handshake" in refused(client).message
    # The broker sees the mismatch, or the NULL peer hanging up on seeing it first (a broken pipe).
    assert failure(tcp_host, (curve.MECHANISM, curve.HANDSHAKE)).socket == "services"


def test_an_unknown_key_is_refused_and_counted(tcp_host):
    server = tcp_host.client().call(BusAuthKeysList()).server_public_key
    public, secret = curve.new_key_pair()
    stranger = curve.ClientKeyFile(
        name="stranger", role="operator", public_key=public, secret_key=secret, server_public_key=server
    )
    path = write_key_file(tcp_host, stranger)
    assert "refused key 'stranger'" in refused(remote_client(tcp_host, path)).message
    assert failure(tcp_host, curve.UNKNOWN_KEY).address == "127.0.0.1"
    assert tcp_host.client().call(BusStats()).auth_failed[curve.UNKNOWN_KEY] >= 1


def test_a_wrong_server_key_is_a_clear_failure(tcp_host):
    impostor, _ = curve.new_key_pair()
    path = key_file(tcp_host, "misled", "operator", server_public_key=impostor)
    assert "wrong server key" in refused(remote_client(tcp_host, path)).message
    assert "cryptography" in failure(tcp_host, curve.HANDSHAKE).message


def test_an_expired_key_is_refused_and_an_expiring_one_is_disconnected(tcp_host):
    stale = remote_client(tcp_host, key_file(tcp_host, "stale", "operator", ttl=0.001))
    assert "refused key 'stale'" in refused(stale).message
    assert failure(tcp_host, curve.EXPIRED).message.startswith("key 'stale' expired at ")

    brief = remote_client(tcp_host, key_file(tcp_host, "brief", "operator", ttl=1.0))
    assert brief.call(BusPing()).caller.key == "brief"
    # Within a heartbeat interval of its expiry the broker closes the connection (ZAP alone would let an
    # open connection live on), and ZAP refuses the reconnection.
    wait_for(lambda: refused_now(brief), timeout=5, what="the expired key's calls to be refused")
    assert failure(tcp_host, curve.EXPIRED, "'brief' expired at").key == "brief"


def refused_now(client: BusClient) -> bool:
    try:
        client.call(BusPing(), timeout=0.5)
    except BusError as exc:
        return exc.code == ErrorCode.UNAUTHENTICATED
    return False


def test_a_revoked_key_is_disconnected_at_once_and_refused_after(tcp_host):
    client = remote_client(tcp_host, key_file(tcp_host, "leaver", "operator"))
    assert client.call(BusPing()).caller.key == "leaver"
    revoked = tcp_host.client().call(BusAuthKeysRevoke(name="leaver"))
    assert (revoked.key.name, revoked.disconnected) == ("leaver", 1)
    assert "refused key 'leaver'" in refused(client).message
    assert failure(tcp_host, curve.REVOKED).key == "leaver"
    assert [k.name for k in tcp_host.client().call(BusAuthKeysList()).keys] == []


def test_a_key_is_let_in_only_on_the_socket_of_its_role(tcp_host):
    keys = curve.load_client_keys(key_file(tcp_host, "confused", "agent", session="s-1"))
    services = f"tcp://127.0.0.1:{tcp_host.config.bus.tcp_port}"  # an agent key belongs on the agents one
    client = BusClient(services, timeout=TIMEOUT, curve=curve.ClientCurve(keys, 1000))
    tcp_host.clients.append(client)
    refused(client)
    assert "may not use the services socket" in failure(tcp_host, curve.WRONG_SOCKET).message


def registering(host, path: str, service: str) -> Connection:
    keys = curve.load_client_keys(path)
    registration = msgspec.msgpack.encode(
        Register(service=service, instance=f"{service}-1", methods=[f"{service}.say"])
    )
    connection = Connection(
        f"tcp://127.0.0.1:{host.config.bus.tcp_port}",
        registration=lambda: registration,
        curve=curve.ClientCurve(keys, 1000),
    )
    host.clients.append(BusClient(connection.endpoint, connection=connection))  # closed with the host
    return connection


def test_only_a_service_key_registers(tcp_host):
    operator = registering(tcp_host, key_file(tcp_host, "not-a-service", "operator"), "shout")
    refusal = wait_for(lambda: operator.refused, what="the operator key's registration to be refused")
    assert refusal.code == ErrorCode.PERMISSION_DENIED
    assert "only a service key may register" in refusal.message

    registering(tcp_host, key_file(tcp_host, "far-service", "service"), "whisper")
    up = tcp_host.wait_service_up("whisper")
    assert up.instance == "whisper-1"


def test_a_service_on_another_host_serves_through_the_runner_with_a_service_key(tcp_host):
    config = remote_config(tcp_host, key_file(tcp_host, "far-echo", "service"))
    with open(tcp_host.tmp_path / "far-echo.log", "ab") as log:
        service = subprocess.Popen([sys.executable, ECHO_SERVICE, "--config", config], stdout=log, stderr=log)
    tcp_host.processes["far-echo"] = service  # stopped with the host
    tcp_host.wait_service_up("echo", f"-{service.pid}")  # (no pid in bus.services: tcp:// has none)
    client = tcp_host.client()
    said = wait_for(lambda: client.call(Say(text="over curve")), what="the remote echo to serve")
    assert (said.text, said.pid, said.caller_socket) == ("over curve", service.pid, "services")


def test_a_silent_tcp_connection_is_closed_within_the_handshake_timeout(tcp_host):
    with socket.create_connection(("127.0.0.1", tcp_host.config.bus.tcp_port), timeout=5) as raw:
        started = time.monotonic()
        while raw.recv(1024):  # the broker's greeting, then nothing until it gives up on us
            pass
        assert time.monotonic() - started < 4  # the handshake timeout is 1 s
    assert failure(tcp_host, curve.HANDSHAKE, "not done in time").socket == "services"


def test_keys_need_tcp_on(host):
    public, _ = curve.new_key_pair()
    with pytest.raises(BusError) as caught:
        host.client().call(BusAuthKeysIssue(name="k", public_key=public, role="operator"))
    assert caught.value.code == ErrorCode.FAILED_PRECONDITION


def test_the_ctl_issues_a_key_file_that_connects_lists_and_revokes_it(tcp_host):
    out = tcp_host.tmp_path / "issued.key"
    issue = ["auth", "keys", "issue", "ctl-made", "--role", "agent", "--session", "s-9", "--expires", "1h"]
    assert json.loads(invoke(tcp_host, *issue, "--out", str(out), json=True).stdout)["state"] == "active"
    assert os.stat(out).st_mode & 0o777 == 0o600
    caller = remote_client(tcp_host, str(out)).call(BusPing()).caller
    assert (caller.role, caller.session, caller.key) == ("agent", "s-9", "ctl-made")
    listed = json.loads(invoke(tcp_host, "auth", "keys", "list", json=True).stdout)
    assert [k["name"] for k in listed["keys"]] == ["ctl-made"]

    taken = invoke(
        tcp_host, "auth", "keys", "issue", "again", "--role", "operator", "--out", str(out), expect=1
    )
    assert "File exists" in taken.output
    unscoped = invoke(
        tcp_host, "auth", "keys", "issue", "lost", "--role", "agent", "--out", str(out) + "2", expect=1
    )
    assert "needs a session" in unscoped.output
    assert not os.path.exists(str(out) + "2")

    assert "1 connection(s) closed" in invoke(tcp_host, "auth", "keys", "revoke", "ctl-made").output
