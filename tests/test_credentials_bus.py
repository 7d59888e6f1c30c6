"""The credential service as its own process on a real broker: baaaht-ctl, kill -9 during writes and
master-key rotations, refusal of a damaged store, and no secret anywhere in what the run leaves."""

from __future__ import annotations

import base64
import hashlib
import random
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgspec
import orjson
import pytest

from baaaht.bus.errors import BusError
from baaaht.bus.testing import next_event
from baaaht.schemas.base import topic_of
from baaaht.schemas.bus import BusEventsReplay
from baaaht.schemas.credentials import (
    CredentialDescribe,
    CredentialExpired,
    CredentialPut,
    CredentialRotate,
    CredentialRotateMaster,
)
from baaaht.services.credentials.master import KeyFile
from baaaht.services.credentials.store import STORE_DIR, STORE_FILE, CredentialStore
from tests import ctl_runner
from tests.test_credentials_store import flip_in_a_sealed_value

SERVICE = "baaaht.services.credentials"
NAME = "credential"
KILL_ITERATIONS = 4


@pytest.fixture
def credential_host(make_host):
    host = make_host({"credentials": {"sweep_interval": "200ms"}})
    host.start_service(SERVICE, NAME)
    return host


def store_path(host) -> Path:
    return Path(host.config.data_dir) / STORE_DIR / STORE_FILE


def key_file(host) -> Path:
    return Path(host.config.credentials.master_key_file)


def open_store(host) -> CredentialStore:
    """The store as the next start of the service finds it (the service is not running)."""
    return CredentialStore.open(host.config.data_dir, KeyFile(str(key_file(host))))


def ctl(host, *args: str, stdin: str | None = None, expect: int = 0) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [ctl_runner.CTL, *ctl_runner.host_args(host), "credentials", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == expect, (args, done.returncode, done.stdout, done.stderr)
    return done


def new_value() -> str:
    return "sk-test-" + secrets.token_hex(16)


def test_ctl_adds_lists_describes_rotates_and_removes(credential_host):
    host = credential_host
    value, second = new_value(), new_value()
    added = orjson.loads(
        ctl(
            host, "add", "anthropic", "--kind", "api-key", "--from-stdin", "--json", stdin=value + "\n"
        ).stdout
    )
    assert (added["name"], added["kind"], added["version"]) == ("anthropic", "api_key", 1)
    ctl(host, "add", "github", "--kind", "basic", "--from-stdin", "--expires-in", "1h", stdin="me:pw")
    table = ctl(host, "list").stdout.splitlines()
    assert table[0].split() == [
        "NAME",
        "KIND",
        "VERSION",
        "CREATED",
        "ROTATED",
        "EXPIRES",
        "LAST_USED",
        "EXPIRED",
    ]
    assert [line.split()[0] for line in table[1:]] == ["anthropic", "github"]
    listed = orjson.loads(ctl(host, "list", "--json").stdout)
    assert listed[1]["expires_at"].endswith("Z")  # one time format
    rotated = orjson.loads(ctl(host, "rotate", "anthropic", "--from-stdin", "--json", stdin=second).stdout)
    assert rotated["version"] == 2
    described = ctl(host, "describe", "anthropic").stdout
    assert "versions" in described and "erase_at" in described
    taken = ctl(host, "add", "anthropic", "--kind", "api-key", "--from-stdin", stdin=value, expect=1)
    assert "ALREADY_EXISTS" in taken.stderr and "rotate" in taken.stderr
    no_terminal = ctl(host, "add", "other", "--kind", "api-key", stdin=value, expect=1)
    assert "--from-stdin" in no_terminal.stderr
    master = orjson.loads(ctl(host, "rotate-master", "--json").stdout)
    assert master["rewrapped"] == 3 and master["source"] == "key_file"
    assert "credential anthropic deleted" in ctl(host, "rm", "anthropic").stdout
    assert "NOT_FOUND" in ctl(host, "describe", "anthropic", expect=1).stderr
    host.kill(NAME)
    with open_store(host) as store:
        assert store.secret_for("github").value == b"me:pw"


def test_an_expiry_is_published_once_on_the_bus(credential_host):
    client = credential_host.client()
    with client.subscribe([topic_of(CredentialExpired)], since=0) as expiries:
        client.call(CredentialPut(name="short", kind="api_key", value=b"v-1", expires_at=time.time() + 0.5))
        expired = next_event(expiries, lambda d: d.event.name == "short", 15, "the expiry").event
        assert isinstance(expired, CredentialExpired)
    assert client.call(CredentialDescribe(name="short")).expired
    replayed = client.call(BusEventsReplay(topics=[topic_of(CredentialExpired)])).events
    time.sleep(0.6)  # three more sweeps: none announces it again
    assert (
        len(client.call(BusEventsReplay(topics=[topic_of(CredentialExpired)])).events) == len(replayed) == 1
    )


def writer(client, prefix: str, acknowledged: dict[str, bytes], stop: threading.Event) -> None:
    """Put secrets one after another until the service dies; record each acknowledged one."""
    n = 0
    while not stop.is_set():
        name, value = f"{prefix}-{n}", new_value().encode()
        try:
            client.call(CredentialPut(name=name, kind="api_key", value=value), timeout=5)
        except BusError:
            return
        acknowledged[name] = value
        n += 1


def assert_every_secret_decrypts(host, expected: dict[str, bytes]) -> None:
    with open_store(host) as store:
        for name, value in expected.items():
            assert store.secret_for(name).value == value, name


def test_kill_9_during_puts_loses_no_acknowledged_secret(credential_host):
    host, rng = credential_host, random.Random()
    acknowledged: dict[str, bytes] = {}
    for iteration in range(KILL_ITERATIONS):
        stop = threading.Event()
        thread = threading.Thread(target=writer, args=(host.client(), f"i{iteration}", acknowledged, stop))
        thread.start()
        time.sleep(rng.uniform(0.05, 0.5))  # a random moment, not a condition: what is being killed
        host.kill(NAME)
        stop.set()
        thread.join(10)
        assert_every_secret_decrypts(host, acknowledged)
        host.start_service(SERVICE, NAME)
    assert len(acknowledged) > KILL_ITERATIONS  # the kills did land among writes


def test_kill_9_during_rotate_master_leaves_every_secret_readable(credential_host):
    host, rng = credential_host, random.Random()
    client = host.client(timeout=30)
    expected = {f"s{n}": new_value().encode() for n in range(300)}
    for name, value in expected.items():
        client.call(CredentialPut(name=name, kind="api_key", value=value))
    started = time.monotonic()
    assert client.call(CredentialRotateMaster()).rewrapped == 300
    window = time.monotonic() - started
    outcomes = []
    for _ in range(KILL_ITERATIONS + 1):
        before = key_file(host).read_bytes()
        rotating = threading.Thread(target=lambda: _ignore_bus_errors(host.client(timeout=30)))
        rotating.start()
        time.sleep(rng.uniform(0, window * 1.5))
        host.kill(NAME)
        rotating.join(35)
        assert_every_secret_decrypts(host, expected)
        outcomes.append("new key" if key_file(host).read_bytes() != before else "old key")
        assert not key_file(host).with_name(key_file(host).name + ".next").exists()
        host.start_service(SERVICE, NAME)
    assert client.call(CredentialRotate(name="s0", value=b"after-the-kills")).version == 2


def _ignore_bus_errors(client) -> None:
    try:
        client.call(CredentialRotateMaster())
    except BusError:
        pass  # killed under it


@pytest.mark.parametrize("damage", ["truncate", "flip a bit"])
def test_a_damaged_store_is_refused_at_start_and_left_untouched(credential_host, damage):
    host = credential_host
    host.client().call(CredentialPut(name="a", kind="api_key", value=new_value().encode()))
    host.kill(NAME, sig=15)
    path = store_path(host)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 3]
    else:
        flip_in_a_sealed_value(data, path)
    path.write_bytes(bytes(data))
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    refused = host.start_service(SERVICE, NAME, wait=False)
    assert refused.wait(30) != 0
    log = host.log(NAME)
    assert f"credential: refusing to start: {path}: " in log
    assert ("does not decrypt" if damage == "flip a bit" else "corrupt") in log
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert path.stat().st_size == len(data)


def test_no_secret_value_appears_in_logs_events_errors_or_the_store_file(credential_host):
    host = credential_host
    value, second = new_value(), new_value()
    outputs = [
        ctl(host, "add", "leak", "--kind", "bearer-token", "--from-stdin", stdin=value),
        ctl(host, "add", "leak", "--kind", "bearer-token", "--from-stdin", stdin=value, expect=1),
        ctl(host, "add", "bad", "--kind", "basic", "--from-stdin", stdin=value, expect=1),
        ctl(host, "rotate", "leak", "--from-stdin", "--grace", "0s", stdin=second),
        ctl(host, "describe", "leak", "--json"),
        ctl(host, "list"),
        ctl(host, "rotate-master"),
    ]
    client = host.client()
    client.call(
        CredentialPut(name="soon", kind="api_key", value=value.encode(), expires_at=time.time() + 0.3)
    )
    with client.subscribe([topic_of(CredentialExpired)], since=0) as expiries:
        next_event(expiries, lambda d: d.event.name == "soon", 15, "the expiry")
    events = client.call(BusEventsReplay(limit=1000)).events
    host.kill(NAME, sig=15)  # a clean stop: its last log lines are written
    seen = b"".join(
        [
            *(o.stdout.encode() + o.stderr.encode() for o in outputs),
            *(msgspec.msgpack.encode(e) for e in events),
            *(p.read_bytes() for p in host.tmp_path.glob("*.log")),
            *(p.read_bytes() for p in store_path(host).parent.iterdir()),
        ]
    )
    assert {"credential.changed", "credential.master_rotated", "credential.expired"} <= {
        e.topic for e in events
    }
    for secret in (value, second):
        # base64 of the value inside a longer text starts at one of three offsets; its last characters
        # depend on what follows.
        forms = [secret.encode()] + [base64.b64encode(secret[offset:].encode())[:-4] for offset in range(3)]
        for form in forms:
            assert seen.count(form) == 0, form


def core_limit(pid: int) -> list[str]:
    (line,) = [line for line in Path(f"/proc/{pid}/limits").read_text().splitlines() if "core file" in line]
    return line.split()[4:6]  # soft, hard


def test_the_credential_process_writes_no_core_file_and_is_not_dumpable(credential_host):
    assert core_limit(credential_host.processes[NAME].pid) == ["0", "0"]
    check = (
        "import resource; from baaaht.services.credentials import hardening;"
        "assert hardening.is_dumpable(); hardening.keep_secrets_in_process();"
        "print(hardening.is_dumpable(), resource.getrlimit(resource.RLIMIT_CORE))"
    )
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60)
    assert done.stdout.split("\n")[0] == "False (0, 0)", done.stderr
