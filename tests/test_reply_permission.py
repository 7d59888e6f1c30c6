"""An answer the table refuses is judged before the call is marked done: the call stays in flight, so its
caller is still answered (TIMEOUT at its deadline) and the service is told to stop. No role is refused
an answer by today's table, so this runs a real broker in this process with a table that refuses one."""

from __future__ import annotations

import threading
import time

import msgspec
import pytest

from baaaht.bus import broker as broker_module
from baaaht.bus import wire
from baaaht.bus.authorize import ANSWER, Denial, authorize
from baaaht.bus.broker import Broker
from baaaht.bus.testing import Host
from tests.test_bus import next_reply, raw_dealer


def refusing_answers_to_mute(role, action, target, service=""):
    if action == ANSWER and target == "mute.wait":
        return Denial(f"{role} peers may not answer {target!r} (test table)")
    return authorize(role, action, target, service)


@pytest.fixture
def in_process(tmp_path, monkeypatch):
    monkeypatch.setattr(broker_module, "authorize", refusing_answers_to_mute)
    host = Host(tmp_path)
    broker = Broker(host.config)
    broker.bind()
    thread = threading.Thread(target=broker.run, daemon=True)
    thread.start()
    yield host
    broker.stop()
    thread.join(10)
    host.stop()


def test_a_refused_answer_leaves_the_call_in_flight_to_be_answered_at_its_deadline(in_process):
    service, caller = raw_dealer(in_process), raw_dealer(in_process)
    try:
        register = {"service": "mute", "instance": "m1", "methods": ["mute.wait"]}
        service.send(wire.pack(wire.REGISTER, body=msgspec.msgpack.encode(register)))
        service.send(wire.request("up", "bus.ping", time.time() + 5, "", False, b"\x80"))
        next_reply(service, "up")
        caller.send(
            wire.request("w", "mute.wait", time.time() + 0.3, "", False, b"\x80")
        )  # before the silent peers expire
        assert service.poll(5000)
        request, route = service.recv_multipart()
        token = route[: wire.TOKEN_SIZE]
        service.send(wire.reply(wire.REPLY, "w", b"\x80", token=token))
        header, body = next_reply(service, "")
        assert header.error == "PERMISSION_DENIED" and b"test table" in body
        header, _ = next_reply(caller, "w")  # not the refused answer: the broker's own, at the deadline
        assert header.error == "TIMEOUT"
        while True:  # and the service was told to stop
            assert service.poll(5000), "no CANCEL for the refused call"
            envelope = service.recv()
            if wire.kind_of(envelope) == wire.CANCEL:
                assert wire.split(envelope)[1] == token
                break
    finally:
        service.close(0)
        caller.close(0)
