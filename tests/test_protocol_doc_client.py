"""A client written from docs/PROTOCOL.md alone: raw pyzmq and msgpack (through msgspec), no
baaaht.bus code. The harness only starts the broker and the echo service. If this test needs
something the doc does not say, the doc is incomplete."""

from __future__ import annotations

import os
import time

import msgspec
import pytest
import zmq

from baaaht.bus.testing import Host
from tests.conftest import ECHO_SERVICE

# "Messages": envelope = "BHT1" | kind | header length (2 bytes, big-endian) | header | body
REQUEST, REPLY, PARTIAL, CANCEL, HEARTBEAT, DISCONNECT, EVENT, EVENTS = (
    b"BHT1" + bytes([kind]) for kind in (1, 2, 3, 4, 6, 7, 8, 9)
)
STREAM = 1  # RequestHeader flags bit 0
encode = msgspec.msgpack.encode
decode = msgspec.msgpack.decode


def envelope(kind: bytes, header: bytes = b"", body: bytes = b"") -> bytes:
    return kind + len(header).to_bytes(2, "big") + header + body


def split(frame: bytes) -> tuple[bytes, bytes, bytes]:
    size = int.from_bytes(frame[5:7], "big")
    return frame[:5], frame[7 : 7 + size], frame[7 + size :]


class DocClient:
    """A DEALER on RUN/bus.sock that heartbeats while it waits, as "Registration, heartbeats
    and failure" requires (the test host's interval is 0.2 s: a silent client is dropped)."""

    def __init__(self, run_dir: str):
        self.socket = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(f"ipc://{run_dir}/bus.sock")
        self.heartbeat_interval = 0.2  # until bus.ping says otherwise
        self.last_sent = 0.0
        self.stray: list[tuple[dict, dict]] = []  # replies with id "" (they answer no call)

    def send(self, frame: bytes) -> None:
        self.socket.send(frame)
        self.last_sent = time.monotonic()

    def request(self, request_id: str, target: str, body: dict, timeout: float = 5.0, flags=0) -> None:
        # RequestHeader = [id, target, deadline (absolute Unix seconds, float), correlation, flags]
        header = encode([request_id, target, time.time() + timeout, "doc-test", flags])
        self.send(envelope(REQUEST, header, encode(body)))

    def next(self, request_id: str, wait: float = 5.0) -> tuple[bytes, list, object]:
        """The next PARTIAL or REPLY for `request_id`: (kind, ReplyHeader, decoded body)."""
        give_up = time.monotonic() + wait
        while time.monotonic() < give_up:
            if time.monotonic() - self.last_sent >= self.heartbeat_interval / 2:
                self.send(envelope(HEARTBEAT))  # a caller's heartbeat has an empty body
            if not self.socket.poll(int(self.heartbeat_interval * 500)):
                continue
            kind, header, body = split(self.socket.recv())
            if kind not in (REPLY, PARTIAL):
                continue  # the broker's HEARTBEATs
            reply_header = decode(header)  # ReplyHeader = [id, error, token]
            if reply_header[0] == request_id:
                return kind, reply_header, decode(body)
            if reply_header[0] == "":
                self.stray.append((reply_header, decode(body)))
        raise AssertionError(f"no reply to {request_id!r} within {wait}s")

    def call(self, request_id: str, target: str, body: dict, timeout: float = 5.0):
        self.request(request_id, target, body, timeout)
        kind, header, result = self.next(request_id, timeout + 2)
        assert kind == REPLY
        return header, result

    def close(self) -> None:
        self.socket.send(envelope(DISCONNECT))  # a clean goodbye, empty body
        self.socket.close()


@pytest.fixture
def doc_host(tmp_path):
    host = Host(tmp_path)
    host.start_broker()
    host.start_service(ECHO_SERVICE, "echo")
    client = DocClient(host.run_dir)
    yield host, client
    client.close()
    host.stop()


def test_a_client_written_from_the_doc_pings_calls_times_out_cancels_and_subscribes(doc_host):
    host, client = doc_host

    # bus.ping: a request body is a map with its `type` tag; the result is a map without one.
    header, pong = client.call("p1", "bus.ping", {"type": "bus.ping"})
    assert header[1] == "" and pong["protocol"] == "BHT1" and pong["broker_pid"] > 0
    assert pong["caller"]["socket"] == "services" and pong["caller"]["pid"] == os.getpid()
    # Fields at their default are left out: were liveness at its default (3), the client would fill it in.
    liveness = pong.get("heartbeat_liveness", 3)
    assert pong["heartbeat_interval"] == pytest.approx(0.2) and liveness == host.config.bus.heartbeat_liveness
    client.heartbeat_interval = pong.get("heartbeat_interval", 1.0)

    # A field at its default may be left out: {} is a valid bus.ping body too. An empty body is not.
    assert client.call("p2", "bus.ping", {})[0][1] == ""
    client.send(envelope(REQUEST, encode(["p3", "bus.ping", time.time() + 5]), b""))
    kind, header, error = client.next("p3")
    assert header[1] == "INVALID_ARGUMENT" and error["code"] == "INVALID_ARGUMENT"

    # A service call: the echo service's result comes back as a map.
    header, said = client.call("s1", "echo.say", {"type": "echo.say", "text": "from the doc"})
    assert header[1] == "" and said["text"] == "from the doc" and said["caller_socket"] == "services"

    # The deadline is absolute Unix time: the broker answers TIMEOUT at it, not later.
    started = time.monotonic()
    client.request("t1", "echo.say", {"type": "echo.say", "text": "slow", "delay": 3.0}, timeout=0.3)
    kind, header, error = client.next("t1")
    assert kind == REPLY and header[1] == "TIMEOUT" and error["code"] == "TIMEOUT"
    assert time.monotonic() - started < 2.0
    # A deadline of 0 is not "no deadline": it has passed.
    client.send(envelope(REQUEST, encode(["t2", "echo.say", 0.0, "", 0]), encode({"text": "x"})))
    assert client.next("t2")[1][1] == "TIMEOUT"

    # A stream: PARTIALs, then a CANCEL whose body is the request id's raw UTF-8 bytes; the
    # broker ends the call with a REPLY CANCELLED.
    client.request("c1", "echo.count", {"type": "echo.count", "to": 10_000, "interval": 0.02}, flags=STREAM)
    kind, header, tick = client.next("c1")
    assert kind == PARTIAL and tick == {"n": 0}
    client.send(envelope(CANCEL, b"", "c1".encode()))
    while kind == PARTIAL:
        kind, header, body = client.next("c1")
    assert header[1] == "CANCELLED" and body["code"] == "CANCELLED"

    # Events: a SUB on RUN/events.sock, prefix b"" (everything), frames [topic, envelope].
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"ipc://{host.run_dir}/events.sock")
    try:
        stamp = wait_for_shout(client, sub)
    finally:
        sub.close()
    topic, (seq, at, source, epoch, prev), event = stamp
    assert topic == "echo.shouted.loud" and event == {"type": "echo.shouted", "text": "hear me"}
    assert source == "echo" and abs(at - time.time()) < 60
    assert epoch == int(pong["started_at"] * 1000)  # the broker's start time in ms
    assert prev == seq - 1  # on PUB every event is sent: the previous one sent is the previous seq

    # The same event by replay: items are [seq, time, topic, source, body] with the body's map inline.
    _, replayed = client.call("r1", "bus.events.replay", {"since": seq - 1, "topics": ["echo."]})
    assert replayed["epoch"] == epoch and replayed["last_seq"] >= seq
    assert replayed["events"][0] == [seq, at, topic, source, event]
    assert client.stray == []


def wait_for_shout(client: DocClient, sub: zmq.Socket):
    """Publish through the echo service until the SUB sees it (a new SUB misses what comes
    before its subscription has reached the broker); skip the broker's HEARTBEATs."""
    for attempt in range(20):
        client.call(f"e{attempt}", "echo.emit", {"type": "echo.emit", "text": "hear me"})
        give_up = time.monotonic() + 0.5
        while sub.poll(max(0, int((give_up - time.monotonic()) * 1000))):
            topic, frame = sub.recv_multipart()
            kind, header, body = split(frame)
            if kind == HEARTBEAT:
                assert topic == b"" and len(decode(header)) == 5  # [last seq, time, "bus", epoch, prev]
                continue
            if kind == EVENTS:  # the broker's batch: [seq, time, topic, source, body] of consecutive events
                seq, at, source, epoch, prev = decode(header)
                batch = decode(body)
                assert topic == b"" and [e[0] for e in batch] == list(range(prev + 1, seq + 1))
                for seq, at, topic_name, source, event in batch:
                    if topic_name == "echo.shouted.loud":
                        return topic_name, [seq, at, source, epoch, seq - 1], event
                continue
            assert kind == EVENT
            if topic.decode() == "echo.shouted.loud":
                return topic.decode(), decode(header), decode(body)
    raise AssertionError("the subscriber saw no echo.shouted event")
