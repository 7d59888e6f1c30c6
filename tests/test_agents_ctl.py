"""baaaht-ctl agents and auth against a real broker."""

from __future__ import annotations

import json
import threading
import time

import msgspec

from baaaht.bus import wire
from baaaht.bus.authorize import DOMAINS, RULES
from tests import ctl_runner
from tests.test_bus import next_reply, raw_dealer


def test_agents_list_shows_container_session_role_and_calls_in_flight(host):
    identity = host.identify("s1", role="assistant")
    agent = host.agent_client()
    agent.call_raw("bus.ping", b"\x80")
    listed = json.loads(ctl_runner.invoke(host, "agents", "list", json=True).stdout)
    assert [(a["container"], a["session"], a["role"], a["in_flight"]) for a in listed] == [
        (identity.container_id, "s1", "assistant", 0)
    ]
    assert abs(listed[0]["connected_since"] - time.time()) < 60
    table = ctl_runner.invoke(host, "agents", "list").stdout.splitlines()
    assert table[0].split() == [
        "CONTAINER",
        "SESSION",
        "ROLE",
        "CONNECTED_SINCE",
        "LAST_SEEN",
        "IN_FLIGHT",
        "PID",
    ]
    assert table[1].split()[:3] == [identity.container_id[:12], "s1", "assistant"]


def test_auth_rules_prints_the_table_the_broker_uses(host):
    rules = json.loads(ctl_runner.invoke(host, "auth", "rules", json=True).stdout)
    served = {(r["role"], r["action"]): r.get("patterns", []) for r in rules["rules"]}
    for role, actions in RULES.items():
        for action, patterns in actions.items():
            assert served[(role, action)] == [p if allowed else f"!{p}" for p, allowed in patterns]
    assert rules["domains"] == {s: list(t) for s, t in DOMAINS.items()}
    lines = [line.split(maxsplit=2) for line in ctl_runner.invoke(host, "auth", "rules").stdout.splitlines()]
    assert ["operator", "call", "!bus.agents.update, *"] in lines
    assert ["unidentified", "call", "bus.ping"] in lines
    assert ["container", "container.*,", "image.*"] in lines


def serve_one_kill(dealer, seen: list) -> None:
    """A container manager that answers one container.kill."""
    while True:
        assert dealer.poll(10_000), "no container.kill came"
        frames = dealer.recv_multipart()
        if wire.kind_of(frames[0]) == wire.REQUEST:
            header_bytes, body = wire.split(frames[0])
            seen.append((wire.request_header.decode(header_bytes).target, msgspec.msgpack.decode(body)))
            header = wire.request_header.decode(header_bytes)
            dealer.send(wire.reply(wire.REPLY, header.id, b"\x80", token=frames[1][: wire.TOKEN_SIZE]))
            return


def test_agents_kill_asks_the_container_manager_to_kill_the_container_by_a_prefix(host):
    identity = host.identify("s1")
    host.agent_client().call_raw("bus.ping", b"\x80")
    manager = raw_dealer(host)
    register = {"service": "container", "instance": "c1", "methods": ["container.kill"]}
    manager.send(wire.pack(wire.REGISTER, body=msgspec.msgpack.encode(register)))
    manager.send(wire.request("up", "bus.ping", time.time() + 5, "", False, b"\x80"))
    next_reply(manager, "up")
    seen: list = []
    server = threading.Thread(target=serve_one_kill, args=(manager, seen))
    server.start()
    try:
        killed = ctl_runner.invoke(host, "agents", "kill", identity.container_id[:10], json=True)
        server.join(15)
    finally:
        manager.close(0)
    assert json.loads(killed.stdout) == {"id": identity.container_id, "killed": True}
    assert seen == [("container.kill", {"type": "container.kill", "id": identity.container_id})]
    unknown = ctl_runner.invoke(host, "agents", "kill", "ffff", expect=None)
    assert unknown.exit_code != 0 and "no connected agent's container starts with 'ffff'" in unknown.output
