"""Agent identity end to end with a real broker: host processes play containers through the kit's fake
/proc (baaaht.bus.testing.broker), identities are the container manager's files in the run directory."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import msgspec
import pytest
import zmq

from baaaht.bus import wire
from baaaht.bus.aio import AsyncBusClient
from baaaht.bus.errors import BusError
from baaaht.bus.testing import next_event, run_async, wait_for
from baaaht.common import socket_group
from baaaht.schemas.bus import BusAgentsList, BusAuthFailed, BusPing, BusStats
from baaaht.schemas.errors import ErrorCode
from baaaht.schemas.sessions import SessionClosed, SessionGet, SessionIdle
from tests.test_bus import next_reply, raw_dealer


def closed(session: str) -> SessionClosed:
    return SessionClosed(session_id=session, owner="o", reason="test")


def idle(session: str) -> SessionIdle:
    return SessionIdle(session_id=session, owner="o", last_activity_at=1.0)


def ping_caller(dealer: zmq.Socket, request_id: str = "ping"):
    dealer.send(wire.request(request_id, "bus.ping", time.time() + 5, "", False, b"\x80"))
    header, body = next_reply(dealer, request_id)
    assert header.error == "", wire.error_body.decode(body)
    return msgspec.msgpack.decode(body)["caller"]


def test_an_agent_gets_its_own_sessions_events_on_its_connection_in_order(host):
    sessions = host.service_client("session")  # publishes session.* for any session
    host.identify("s1")
    agent = host.agent_client()
    with agent.subscribe(["session."]) as events:
        for event in (closed("s2"), closed("s1"), idle("s10"), idle("s1")):
            sessions.publish(event)
        received = [events.next(timeout=5) for _ in range(2)]
        assert [d.topic for d in received] == ["session.closed/s1", "session.idle/s1"]
        assert received[0].seq < received[1].seq and received[0].source == "session"
        assert events.next(timeout=0.3) is None  # nothing of s2, s10 or the host
        assert events.gaps == 0
    with agent.subscribe(["session.idle"], since=0) as replayed:  # the same, from the history
        assert replayed.next(timeout=5).event == idle("s1")
        assert replayed.next(timeout=0.3) is None


def test_the_async_client_subscribes_on_the_agent_connection_too(host):
    sessions = host.service_client("session")
    host.identify("s1", role="assistant")
    bus = host.config.bus

    async def follow():
        async with AsyncBusClient(
            host.endpoints.agents, heartbeat_interval=float(bus.heartbeat_interval)
        ) as agent:
            events = agent.subscribe(["session.closed"])

            async def publish_until_seen():
                while True:  # another session's first, every time: it must never arrive
                    sessions.publish(closed("s2"))
                    sessions.publish(closed("s1"))
                    await asyncio.sleep(0.05)

            publisher = asyncio.ensure_future(publish_until_seen())
            try:
                return await events.__anext__()
            finally:
                publisher.cancel()
                await events.aclose()

    delivery = run_async(follow(), timeout=15)
    assert delivery.topic == "session.closed/s1" and delivery.event == closed("s1")


def test_a_subscription_naming_another_session_is_refused(host):
    host.identify("s1")
    agent = raw_dealer(host, "agents")
    try:
        agent.send(wire.pack(wire.SUBSCRIBE, body=msgspec.msgpack.encode(["session.message/s2"])))
        header, body = next_reply(agent, "")
        assert header.error == "PERMISSION_DENIED" and "'s2'" in wire.error_body.decode(body).message
        body = msgspec.msgpack.encode({"topics": ["session.closed/s2"]})
        agent.send(wire.request("r", "bus.events.replay", time.time() + 5, "", False, body))
        assert next_reply(agent, "r")[0].error == "PERMISSION_DENIED"
    finally:
        agent.close(0)


def test_an_agents_subscription_survives_a_broker_restart(host):
    host.identify("s1")
    agent = host.agent_client(timeout=10)
    with agent.subscribe(["session.closed"]) as events:
        host.kill("broker", signal.SIGKILL)
        host.start_broker()
        sessions = host.service_client("session")
        wait_for(lambda: len(host.client().call(BusAgentsList()).agents) == 1, what="the agent to reconnect")
        wait_for(lambda: agent.call(BusPing()).caller.session == "s1", what="the agent to be itself again")
        for _ in range(50):  # until its SUBSCRIBE, sent on the reconnect, has reached the new broker
            sessions.publish(closed("s1"))
            delivery = events.next(timeout=0.2)
            if delivery is not None:
                break
        assert delivery is not None and delivery.topic == "session.closed/s1"


def test_an_agent_without_an_identity_may_only_ping_and_is_reported(host):
    failures = host.client().subscribe(["bus.auth.failed"])
    agent = host.agent_client()
    assert agent.call(BusPing()).caller.role == "unidentified"
    for _ in range(3):
        with pytest.raises(BusError) as caught:
            agent.call(SessionGet(session_id="s1"))
        assert caught.value.code == ErrorCode.PERMISSION_DENIED
        assert "unidentified peers may not call 'session.get'" in caught.value.message
    failed = next_event(failures, lambda d: isinstance(d.event, BusAuthFailed), what="bus.auth.failed").event
    assert (failed.reason, failed.socket) == ("unidentified", "agents")
    assert f"pid {os.getpid()}" in failed.address and "session.get" in failed.message
    assert failures.next(timeout=0.5) is None  # the others of the period are summed up at its end
    failures.close()
    assert host.client().call(BusStats()).auth_failed == {"unidentified": 3}


def test_revoking_an_identity_refuses_and_disconnects_its_connection_at_once(host):
    identity = host.identify("s1")
    agent = raw_dealer(host, "agents", routing_id=b"doomed")
    closes = agent.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    try:
        assert ping_caller(agent)["session"] == "s1"
        result = host.revoke(identity.container_id)
        assert (result.connections, result.revoked, result.role) == (1, True, "unidentified")
        assert closes.poll(2000), "the broker did not close the revoked connection"
        assert host.client().call(BusAgentsList()).agents == []
        # The DEALER reconnects by itself: a new connection, looked up again, with no identity.
        agent.send(wire.request("get", "session.get", time.time() + 5, "", False, b"\x80"))
        header, body = next_reply(agent, "get")
        assert header.error == "PERMISSION_DENIED" and b"unidentified" in body
    finally:
        agent.disable_monitor()
        closes.close(0)
        agent.close(0)


def test_a_warm_pool_claim_gives_a_connected_container_its_identity(host):
    container = host.identify("pool", role="worker").container_id
    host.identities.remove(container)  # a pooled container: in the cgroup, no identity yet
    agent = raw_dealer(host, "agents")
    try:
        assert ping_caller(agent)["role"] == "unidentified"
        host.identify("s7", role="worker", container=container)  # the claim writes the identity...
        result = host.update(container)  # ...and tells the broker
        assert (result.connections, result.revoked, result.role, result.session) == (1, False, "worker", "s7")
        caller = ping_caller(agent, "claimed")  # the same connection, stamped anew
        assert (caller["role"], caller["session"], caller["container"]) == ("worker", "s7", container)
    finally:
        agent.close(0)


def test_a_connection_keeps_the_identity_it_had_when_it_was_made(host):
    """Pid reuse: once the connection is made, what /proc says of its pid later changes nothing."""
    first = host.identify("s1")
    agent = raw_dealer(host, "agents")
    try:
        assert ping_caller(agent)["container"] == first.container_id
        host.identify("s2")  # the pid now names another container
        assert ping_caller(agent, "later")["container"] == first.container_id
    finally:
        agent.close(0)


def test_a_departed_agents_routing_id_is_no_way_into_its_identity(host):
    host.identify("s1")
    first = raw_dealer(host, "agents", routing_id=b"reused")
    try:
        assert ping_caller(first)["session"] == "s1"
    finally:
        first.close(0)
    # ZeroMQ gives a routing id to a new connection once the old one's is free.
    wait_for(lambda: host.client().call(BusAgentsList()).agents == [], what="the first agent to be gone")
    host.forget_pid()  # the next connection is made by a process in no container
    second = raw_dealer(host, "agents", routing_id=b"reused")
    try:
        caller = ping_caller(second)
        assert (caller["peer"], caller["role"], caller.get("session")) == (
            b"reused".hex(),
            "unidentified",
            None,
        )
    finally:
        second.close(0)


FOREIGN_PING = """
import os, sys, time, msgspec, zmq
from baaaht.bus import wire
gid = int(sys.argv[2])
os.setgroups([gid])
os.setgid(gid)
os.setuid(1000)  # after the imports: uid 1000 may not read this interpreter's files
dealer = zmq.Context.instance().socket(zmq.DEALER)
dealer.connect(sys.argv[1])
dealer.send(wire.request("p", "bus.ping", time.time() + 5, "", False, b"\\x80"))
while True:
    assert dealer.poll(5000), "no answer"
    envelope = dealer.recv()
    if wire.kind_of(envelope) == wire.REPLY:
        header, body = wire.split(envelope)
        print(wire.reply_header.decode(header).error, wire.error_body.decode(body).message)
        break
dealer.close(0)
"""


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a process as another uid")
def test_a_services_socket_peer_of_another_uid_is_refused_and_reported(host):
    failures = host.client().subscribe(["bus.auth.failed"])
    gid = socket_group.ensure_gid(host.config.bus.socket_group)
    refused = subprocess.run(
        [sys.executable, "-c", FOREIGN_PING, host.endpoints.services, str(gid)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert refused.returncode == 0, refused.stderr
    assert refused.stdout.startswith("PERMISSION_DENIED refused peers may not call 'bus.ping'")
    failed = next_event(failures, lambda d: isinstance(d.event, BusAuthFailed), what="bus.auth.failed").event
    assert (failed.reason, failed.socket) == ("foreign_uid", "services") and "uid 1000" in failed.address
    failures.close()
