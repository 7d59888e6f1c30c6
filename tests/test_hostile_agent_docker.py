"""A hostile agent in a real container of the agent image, started by the real container manager (which
issues its identity) on a real broker with the session and policy services: everything its role forbids
is refused with PERMISSION_DENIED within its deadline and changes nothing; what its role allows works;
once its container is being stopped its next message is refused and its connection closed."""

from __future__ import annotations

import json

import pytest

from baaaht.bus.testing import wait_for
from baaaht.schemas.bus import BusAgentsList
from baaaht.schemas.containers import (
    ContainerCreate,
    ContainerList,
    ContainerSpec,
    ContainerStart,
    ContainerStop,
)
from baaaht.schemas.sessions import SessionGet, SessionMessages, SessionSendMessage
from tests import container_support
from tests.test_containers_bus import SETTINGS, Orchestrator

docker_client = container_support.docker_client

pytestmark = pytest.mark.docker

WAIT = 60.0  # a container start and a Python start on a busy machine
DEADLINE = 5.0  # of each of the agent's calls and raw attempts

# Run inside the container: each attempt's outcome as a JSON line.
HOSTILE = r"""
import json, os, signal, sys, threading, time
import msgspec, zmq
from baaaht.bus import wire
from baaaht.bus.client import BusClient
from baaaht.bus.errors import BusError

own, other, deadline = sys.argv[1], sys.argv[2], float(sys.argv[3])
endpoint = os.environ["BAAAHT_BUS"]
encode = msgspec.msgpack.encode
stopping = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stopping.set())


def report(what, outcome, took=0.0, **extra):
    print(json.dumps({"what": what, "outcome": outcome, "took": took, **extra}), flush=True)


bus = BusClient(endpoint, timeout=deadline)


def call(what, target, body):
    started = time.monotonic()
    try:
        result = msgspec.msgpack.decode(bus.call_raw(target, encode(body)))
        outcome, message = "ALLOWED", ""
    except BusError as exc:
        result, outcome, message = None, exc.code.value, exc.message
    report(what, outcome, time.monotonic() - started, message=message)
    return result


report("caller", "ALLOWED", caller=call("ping", "bus.ping", {})["caller"])
some_id = "f" * 64
for what, target, body in [
    ("container.create", "container.create", {"spec": {"image": "busybox:1"}, "session_id": own}),
    ("container.destroy", "container.destroy", {"id": some_id}),
    ("container.reconcile", "container.reconcile", {}),
    ("container.list", "container.list", {}),
    ("policy.reload", "policy.reload", {}),
    ("policy.evaluate", "policy.evaluate", {"spec": {"image": "busybox:1"}, "principal": "operator-forged"}),
    ("policy.audit.tail", "policy.audit.tail", {}),
    ("session.list", "session.list", {}),
    ("session.create", "session.create", {"owner": "agent"}),
    ("session.close", "session.close", {"session_id": other}),
    ("session.delete", "session.delete", {"session_id": other}),
    ("session.update other", "session.update", {"session_id": other, "name": "owned"}),
    ("session.update own", "session.update", {"session_id": own, "name": "owned"}),
    ("session.get other", "session.get", {"session_id": other}),
    ("session.messages other", "session.messages", {"session_id": other}),
    ("session.send_message other", "session.send_message", {"session_id": other, "content": "forged"}),
    ("bus.peers", "bus.peers", {}),
    ("bus.agents.update", "bus.agents.update", {"container_id": some_id}),
]:
    call(what, target, body)

# What no call can carry: raw frames on a DEALER of its own, refused by a REPLY of id "" or a DISCONNECT.
dealer = zmq.Context.instance().socket(zmq.DEALER)
dealer.setsockopt(zmq.LINGER, 0)
dealer.connect(endpoint)


def refusal(what, envelope):
    started = time.monotonic()
    dealer.send(envelope)
    while dealer.poll(int(deadline * 1000)):
        answer = dealer.recv()
        kind = wire.kind_of(answer)
        header, body = wire.split(answer)
        if kind == wire.DISCONNECT or (kind == wire.REPLY and wire.reply_header.decode(header).id == ""):
            error = wire.error_body.decode(body)
            report(what, error.code.value, time.monotonic() - started, message=error.message)
            return
    report(what, "NO ANSWER", time.monotonic() - started)


refusal("forged reply", wire.reply(wire.REPLY, "1", encode({"id": own}), token=(1).to_bytes(8, "big")))
refusal("subscribe other", wire.pack(wire.SUBSCRIBE, body=encode([f"session.message/{other}"])))
refusal("publish session.created", wire.pack(wire.EVENT, b"session.created", encode({"id": own})))
refusal("publish other session", wire.pack(wire.EVENT, f"agent.progress/{other}".encode(), encode({})))
register = {"service": "session", "instance": "evil", "methods": ["session.get"]}
refusal("register", wire.pack(wire.REGISTER, body=encode(register)))  # last: it is disconnected
dealer.close(0)

# What its role allows: its own session, and its own session's events on its connection.
call("session.get own", "session.get", {"session_id": own})
with bus.subscribe(["session.message"]) as events:
    message = {"session_id": own, "content": "hi", "role": "assistant"}
    call("session.send_message own", "session.send_message", message)
    delivery = events.next(timeout=deadline)
    report("own event", "ALLOWED" if delivery else "NOT DELIVERED", topic=delivery.topic if delivery else "")

# Being stopped (SIGTERM, with a long grace): it goes on acting; its next message must be refused.
report("ready to be stopped", "ALLOWED")
stopping.wait(60)
for _ in range(200):
    started = time.monotonic()
    try:
        bus.call_raw("session.get", encode({"session_id": own}), timeout=deadline)
    except BusError as exc:
        report("after stop", exc.code.value, time.monotonic() - started, message=exc.message)
        break
    time.sleep(0.05)
else:
    report("after stop", "ALLOWED")
report("caller after stop", "ALLOWED", caller=call("ping after stop", "bus.ping", {})["caller"])
bus.close()
"""

# What its role allows, and what it sends in order to see how it is refused.
ALLOWED = {
    "ping",
    "caller",
    "session.get own",
    "session.send_message own",
    "own event",
    "ready to be stopped",
}
ALLOWED |= {"ping after stop", "caller after stop"}


@pytest.fixture
def orchestrator(make_host, docker_client):
    made = Orchestrator(make_host(SETTINGS), docker_client)
    yield made
    made.cleanup()


def outcomes(logs: bytes) -> dict[str, dict]:
    lines = [json.loads(line) for line in logs.decode().splitlines() if line.startswith("{")]
    return {outcome["what"]: outcome for outcome in lines}


def test_a_hostile_agent_is_refused_everything_its_role_forbids(orchestrator, agent_image):
    bus = orchestrator.bus
    own, other = orchestrator.session(), orchestrator.session()
    bus.call(SessionSendMessage(session_id=other, content="bob's secret"))
    before = (bus.call(SessionGet(session_id=other)), bus.call(SessionMessages(session_id=other)))
    spec = ContainerSpec(image=agent_image, command=["python3", "-c", HOSTILE, own, other, str(DEADLINE)])
    container = bus.call(ContainerCreate(spec=spec, session_id=own)).id
    bus.call(ContainerStart(id=container))
    engine = orchestrator.docker.containers.get(container)
    wait_for(lambda: b"ready to be stopped" in engine.logs(), timeout=WAIT, what="the agent's attempts")
    assert [a.container for a in bus.call(BusAgentsList()).agents] == [container]
    bus.call(ContainerStop(id=container, timeout=WAIT), timeout=WAIT + 10)
    seen = outcomes(engine.logs())

    caller = seen["caller"]["caller"]
    assert (caller["role"], caller["session"], caller["container"]) == ("agent", own, container)
    forbidden = {what: o for what, o in seen.items() if what not in ALLOWED}
    assert set(forbidden) == {
        "container.create", "container.destroy", "container.reconcile", "container.list",
        "policy.reload", "policy.evaluate", "policy.audit.tail",
        "session.list", "session.create", "session.close", "session.delete",
        "session.update other", "session.update own",
        "session.get other", "session.messages other", "session.send_message other",
        "bus.peers", "bus.agents.update",
        "forged reply", "subscribe other", "publish session.created", "publish other session", "register",
        "after stop",
    }  # fmt: skip
    assert {what: o["outcome"] for what, o in forbidden.items() if o["outcome"] != "PERMISSION_DENIED"} == {}
    assert max(o["took"] for o in forbidden.values()) < DEADLINE
    # revoked on its connection (refused there), or that connection already closed: the new one has none
    after_stop = forbidden["after stop"]["message"]
    assert "was revoked" in after_stop or "unidentified peers may not call" in after_stop, after_stop
    assert seen["caller after stop"]["caller"]["role"] == "unidentified"
    # what its role allows worked
    assert {seen[what]["outcome"] for what in ALLOWED} == {"ALLOWED"}
    assert seen["own event"]["topic"] == f"session.message/{own}"
    # nothing changed: session B, the containers
    assert (bus.call(SessionGet(session_id=other)), bus.call(SessionMessages(session_id=other))) == before
    assert [c.id for c in bus.call(ContainerList()).containers] == [container]
