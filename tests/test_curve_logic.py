"""The pure parts of CURVE on tcp://: who a key lets in, the key files, refusals told sparingly, and the
client core's answer to a refused handshake."""

from __future__ import annotations

import logging
import os

import pytest

from baaaht.bus import curve, wire
from baaaht.bus.auth_failures import AuthFailures
from baaaht.bus.errors import BusError
from baaaht.bus.protocol import ClientCore
from baaaht.schemas.bus import BusAuthFailed, BusAuthKeysIssue, KeyRecord
from baaaht.schemas.errors import ErrorCode

WALL = 1_800_000_000.0
PUBLIC, _SECRET = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7", "JTKVSB%%)wK0E.X)V>+}o?pNmC{O&4W4b!Ni{Lh6"
SERVER = "S" * 40  # the broker's public key


def record(role: str = "operator", session: str = "", expires_at: float = 0.0) -> KeyRecord:
    return KeyRecord(
        name="k", public_key=PUBLIC, role=role, session=session, issued_at=WALL - 10, expires_at=expires_at
    )


def test_a_key_nobody_issued_is_refused():
    assert curve.judge(None, "services", WALL).reason == curve.UNKNOWN_KEY


def test_an_expired_key_is_refused_from_its_expiry_on():
    assert curve.judge(record(expires_at=WALL + 1), "services", WALL) is None
    refusal = curve.judge(record(expires_at=WALL), "services", WALL)
    assert refusal.reason == curve.EXPIRED
    assert refusal.message == "key 'k' expired at 2027-01-15T08:00:00Z"


@pytest.mark.parametrize(
    "role, socket, allowed",
    [
        ("operator", "services", True),
        ("service", "events", True),
        ("agent", "agents", True),
        ("worker", "agents", True),
        ("assistant", "services", False),
        ("agent", "events", False),  # PUB would send it every session's events
        ("operator", "agents", False),
        ("service", "agents", False),
    ],
)
def test_a_key_fits_only_the_sockets_of_its_role(role, socket, allowed):
    refusal = curve.judge(record(role=role, session="s" if role in curve.AGENT_ROLES else ""), socket, WALL)
    assert (refusal is None) == allowed
    if not allowed:
        assert refusal.reason == curve.WRONG_SOCKET
        assert f"may not use the {socket} socket" in refusal.message


def test_agent_keys_need_a_session_and_host_keys_take_none():
    assert "needs a session" in curve.check_issue("worker", "")
    assert "takes no session" in curve.check_issue("operator", "s-1")
    assert curve.check_issue("agent", "s-1") is None
    assert curve.check_issue("service", "") is None


def test_issued_and_revoked_keys_survive_a_restart_in_a_private_file(tmp_path):
    keys = curve.KeyRegistry(tmp_path)
    made = keys.issue(BusAuthKeysIssue(name="a", public_key=PUBLIC, role="operator"), WALL, SERVER)
    assert os.stat(keys.path).st_mode & 0o777 == 0o600
    again = curve.KeyRegistry(tmp_path)
    assert again.judge(PUBLIC, "services", WALL) == (made, None)
    again.remove("a")
    after = curve.KeyRegistry(tmp_path)
    found, refusal = after.judge(PUBLIC, "services", WALL)
    assert (found.name, refusal.reason) == ("a", curve.REVOKED)  # not "a key nobody issued"
    assert after.records() == []


def test_the_broker_key_is_made_once_and_a_readable_one_is_refused(tmp_path):
    first = curve.load_or_create_server_key(tmp_path / "keys")
    assert os.stat(tmp_path / "keys").st_mode & 0o777 == 0o700
    assert os.stat(tmp_path / "keys" / curve.SERVER_KEY_FILE).st_mode & 0o777 == 0o600
    assert curve.load_or_create_server_key(tmp_path / "keys") == first
    os.chmod(tmp_path / "keys" / curve.SERVER_KEY_FILE, 0o640)
    with pytest.raises(curve.KeyFileError, match="readable by others .* chmod 600"):
        curve.load_or_create_server_key(tmp_path / "keys")


def test_a_client_key_file_others_can_read_is_refused(tmp_path):
    path = tmp_path / "client.key"
    keys = curve.ClientKeyFile(
        name="k", role="operator", public_key=PUBLIC, secret_key=_SECRET, server_public_key=PUBLIC
    )
    curve.write_private(path, curve.encode_json(keys))
    assert curve.load_client_keys(str(path)) == keys
    os.chmod(path, 0o644)
    with pytest.raises(curve.KeyFileError, match="readable by others"):
        curve.load_client_keys(str(path))
    with pytest.raises(curve.KeyFileError, match="No such file"):
        curve.load_client_keys(str(tmp_path / "missing.key"))


def test_issuing_refuses_taken_names_and_keys(tmp_path):
    keys = curve.KeyRegistry(tmp_path)
    issue = BusAuthKeysIssue(name="a", public_key=PUBLIC, role="agent", session="s-1", ttl=60)
    made = keys.issue(issue, WALL, SERVER)
    assert (made.expires_at, made.session) == (WALL + 60, "s-1")
    for request, code in (
        (issue, ErrorCode.ALREADY_EXISTS),  # the name
        (BusAuthKeysIssue(name="b", public_key=PUBLIC, role="operator"), ErrorCode.ALREADY_EXISTS),
        (BusAuthKeysIssue(name="c", public_key=SERVER, role="operator"), ErrorCode.ALREADY_EXISTS),
        (BusAuthKeysIssue(name="d", public_key="D" * 40, role="agent"), ErrorCode.INVALID_ARGUMENT),
    ):
        with pytest.raises(BusError) as caught:
            keys.issue(request, WALL, SERVER)
        assert caught.value.code == code
    keys.remove("a")
    with pytest.raises(BusError, match="make a new key pair"):  # a revoked key pair is not reissued
        keys.issue(BusAuthKeysIssue(name="a", public_key=PUBLIC, role="operator"), WALL, SERVER)


def refusal(reason: str = curve.UNKNOWN_KEY, address: str = "10.0.0.1") -> BusAuthFailed:
    return BusAuthFailed(
        socket="services", reason=reason, message=f"{reason} from {address}", address=address
    )


def test_the_first_refusal_of_a_period_is_told_and_the_rest_summed_up(caplog):
    failures = AuthFailures(logging.getLogger("test.auth"), period=2.0)
    with caplog.at_level(logging.WARNING, "test.auth"):
        assert failures.note(refusal(), 0.0) == [refusal()]
        assert failures.note(refusal(address="10.0.0.2"), 0.5) == []
        assert failures.note(refusal(address="10.0.0.3"), 1.0) == []
        assert failures.note(refusal(curve.EXPIRED), 1.0) == [refusal(curve.EXPIRED)]  # each reason its own
        assert failures.flush(1.9) == []
        (summary,) = failures.flush(2.0)
    assert (summary.count, summary.address) == (2, "10.0.0.3")
    assert failures.by_reason == {curve.UNKNOWN_KEY: 3, curve.EXPIRED: 1}
    assert [r.getMessage() for r in caplog.records] == [
        "refused a peer",
        "refused a peer",
        "more refused peers",
    ]
    assert failures.note(refusal(), 2.5) == [refusal()]  # a new period


def core() -> ClientCore:
    return ClientCore("tcp://192.0.2.1:5555", heartbeat_interval=1.0, liveness=3, wall_clock=lambda: WALL)


def test_a_refused_handshake_fails_calls_at_once_until_one_succeeds():
    client = core()
    pending: list = []
    client.start(client.new_call("bus.ping", b"\x80", 5.0, "", False, pending.append, 0.0))
    refused = BusError(ErrorCode.UNAUTHENTICATED, "the broker refused key 'k'")
    client.on_handshake_failed(refused, 0.1, retry_after=1.0)
    assert BusError.from_body(wire.error_body.decode(pending[0][2])).message == refused.message

    later: list = []
    call = client.new_call("bus.ping", b"\x80", 5.0, "", False, later.append, 0.2)
    assert client.start(call) is None  # not sent: answered at once
    assert later[0][1].error == "UNAUTHENTICATED"
    assert client.give_up(call) is refused

    assert client.tick(0.9) == ((), False)
    assert client.tick(1.1) == ((), True)  # libzmq gave up on the endpoint: a new socket tries again
    assert client.tick(1.2) == ((), False)

    client.on_connected(1.3)
    assert client.start(client.new_call("bus.ping", b"\x80", 5.0, "", False, later.append, 1.3)) is not None
