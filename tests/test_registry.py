"""The broker's registry without sockets: time is an argument, nothing sleeps."""

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from baaaht.bus.connections import Connections, Credentials, agent_role, host_role
from baaaht.bus.errors import BusError
from baaaht.bus.registry import AGENTS_SOCKET, SERVICES_SOCKET, EventLog, Registry
from baaaht.common.identity import AgentIdentity
from baaaht.schemas.bus import Caller, Register, ReplayResult, ServiceDown, ServiceUp, StampedEvent
from baaaht.schemas.errors import ErrorCode

CONTAINER = "c" * 64
_connections = Connections()
_fds = iter(range(10, 10**6))


def make_registry() -> Registry:
    return Registry(heartbeat_interval=1.0, liveness=3, encode_caller=msgspec.msgpack.encode)


def connection(index=0, uid=1000, pid=42, role="operator", identity=None, container=""):
    accepted, _replaced = _connections.accepted(
        index, next(_fds), Credentials(uid, uid, pid, 7), 0.0, role, container, identity
    )
    return accepted


def agent_connection(session="s1", role="agent", container=CONTAINER):
    identity = AgentIdentity(
        container_id=container, session_id=session, role=role, install_id="i", issued_at=0
    )
    return connection(
        1, uid=1000, pid=4242, role=agent_role(identity), identity=identity, container=container
    )


def add_instance(registry, ident: bytes, now=0.0, methods=("echo.say",), concurrency=1, service="echo"):
    peer = registry.touch((0, ident), SERVICES_SOCKET, connection(), now)
    registry.register(
        peer,
        Register(service=service, instance=ident.decode(), methods=list(methods), concurrency=concurrency),
    )
    return peer


def client(registry, ident=b"c", now=0.0, socket=SERVICES_SOCKET):
    if socket == SERVICES_SOCKET:
        return registry.touch((0, ident), socket, connection(), now)
    return registry.touch((1, ident), socket, connection(1, role="unidentified"), now)


def test_peer_credentials_come_from_the_connection():
    registry = make_registry()
    peer = add_instance(registry, b"a")
    assert (peer.caller.uid, peer.caller.pid, peer.caller.service, peer.caller.role) == (
        1000,
        42,
        "echo",
        "service",
    )


def test_an_agent_is_stamped_with_its_containers_identity():
    registry = make_registry()
    peer = registry.touch((1, b"agent"), AGENTS_SOCKET, agent_connection("s1", "worker"), 0.0)
    assert peer.role == "worker"
    assert peer.caller == Caller(
        socket="agents",
        peer=b"agent".hex(),
        uid=1000,
        gid=1000,
        pid=4242,
        role="worker",
        session="s1",
        container=CONTAINER,
    )
    assert msgspec.msgpack.decode(peer.caller_frame, type=Caller) == peer.caller


def test_an_agent_without_an_identity_is_unidentified_and_names_no_container():
    registry = make_registry()
    bare = connection(1, role="unidentified", container=CONTAINER)
    peer = registry.touch((1, b"agent"), AGENTS_SOCKET, bare, 0.0)
    assert (peer.role, peer.caller.session, peer.caller.container) == ("unidentified", "", "")


@pytest.mark.parametrize("role", ["service", "operator", "unidentified", "root", ""])
def test_an_identity_grants_only_an_agent_role(role):
    identity = AgentIdentity(container_id=CONTAINER, session_id="s", role=role, install_id="i", issued_at=0)
    assert agent_role(identity) == "unidentified"


def test_a_new_identity_is_stamped_on_what_the_peer_sends_from_then_on():
    """A warm-pool claim: the connection had no identity; then it has one; then it is revoked."""
    registry = make_registry()
    bare = connection(1, role="unidentified", container=CONTAINER)
    peer = registry.touch((1, b"pooled"), AGENTS_SOCKET, bare, 0.0)
    identity = AgentIdentity(
        container_id=CONTAINER, session_id="s9", role="assistant", install_id="i", issued_at=0
    )
    assert not Connections.reidentify(bare, identity)
    registry.restamp(peer)
    assert (peer.role, peer.caller.session, peer.caller.container) == ("assistant", "s9", CONTAINER)
    assert msgspec.msgpack.decode(peer.caller_frame, type=Caller) == peer.caller
    assert Connections.reidentify(bare, None)  # revoked
    assert bare.revoked and bare.role == "unidentified"


def test_a_reused_fd_is_a_new_connection_and_the_old_ones_peers_are_handed_back():
    connections = Connections()
    first, replaced = connections.accepted(1, 9, Credentials(1000, 1000, 5, 1), 0.0, "agent", CONTAINER)
    assert replaced is None
    first.peers.add((1, b"a"))
    second, replaced = connections.accepted(1, 9, Credentials(1000, 1000, 6, 2), 0.0, "unidentified")
    assert replaced is first and not first.live and replaced.peers == {(1, b"a")}
    assert connections.current(1, 9) is second and connections.of_container(CONTAINER) == []
    assert connections.closed(1, 9) is second and connections.current(1, 9) is None


def test_least_loaded_instance_gets_the_request():
    registry = make_registry()
    add_instance(registry, b"a")
    add_instance(registry, b"b")
    caller = client(registry)
    first = registry.route(caller, "1", "echo.say", deadline=10, now=0)
    second = registry.route(caller, "2", "echo.say", deadline=10, now=0)
    assert {first.instance.instance_id, second.instance.instance_id} == {"a", "b"}
    registry.complete(first.instance.peer, first.token, final=True)
    third = registry.route(caller, "3", "echo.say", deadline=10, now=0)
    assert third.instance is first.instance


def test_concurrency_weights_the_choice():
    registry = make_registry()
    add_instance(registry, b"small", concurrency=1)
    add_instance(registry, b"big", concurrency=4)
    caller = client(registry)
    chosen = [registry.route(caller, str(n), "echo.say", 10, 0).instance.instance_id for n in range(5)]
    assert chosen.count("big") == 4


@pytest.mark.parametrize(
    "target, code",
    [
        ("nosuch.method", ErrorCode.UNAVAILABLE),
        ("echo.nosuch", ErrorCode.NOT_FOUND),
        ("echo", ErrorCode.INVALID_ARGUMENT),
    ],
)
def test_unroutable_targets_are_named(target, code):
    registry = make_registry()
    add_instance(registry, b"a")
    with pytest.raises(BusError) as caught:
        registry.route(client(registry), "1", target, 10, 0)
    assert caught.value.code == code


def test_expired_deadline_is_not_delivered():
    registry = make_registry()
    add_instance(registry, b"a")
    with pytest.raises(BusError) as caught:
        registry.route(client(registry), "1", "echo.say", deadline=5, now=6)
    assert caught.value.code == ErrorCode.TIMEOUT


def test_unhealthy_instances_are_skipped():
    registry = make_registry()
    sick = add_instance(registry, b"sick")
    registry.set_health(sick, False, "engine down")
    with pytest.raises(BusError) as caught:
        registry.route(client(registry), "1", "echo.say", 10, 0)
    assert caught.value.code == ErrorCode.UNAVAILABLE and "engine down" in caught.value.message
    add_instance(registry, b"well")
    assert registry.route(client(registry), "2", "echo.say", 10, 0).instance.instance_id == "well"


def test_roles_come_from_the_connection_and_registration():
    registry = make_registry()
    assert client(registry, b"agent", socket=AGENTS_SOCKET).role == "unidentified"
    assert client(registry, b"ctl").role == "operator"
    assert add_instance(registry, b"svc").role == "service"


@pytest.mark.parametrize(
    "service, methods", [("bus", ["bus.ping"]), ("Bad Name", ["x.y"]), ("echo", ["other.say"])]
)
def test_bad_registrations_are_refused(service, methods):
    registry = make_registry()
    peer = client(registry)
    with pytest.raises(BusError) as caught:
        registry.register(peer, Register(service=service, instance="x", methods=methods))
    assert caught.value.code == ErrorCode.INVALID_ARGUMENT


def test_silent_instance_dies_and_its_requests_fail_unavailable():
    registry = make_registry()
    add_instance(registry, b"a", now=0)
    caller = client(registry, now=0)
    request = registry.route(caller, "1", "echo.say", deadline=100, now=0)
    caller.last_seen = 3.5
    failures, cancels = registry.expire_peers(now=3.5)  # 3 intervals of silence from the service
    assert [f.request.request_id for f in failures] == [request.request_id]
    assert failures[0].code == ErrorCode.UNAVAILABLE
    assert cancels == []
    assert "echo" not in registry.pools
    with pytest.raises(BusError):
        registry.route(caller, "2", "echo.say", deadline=100, now=3.5)


def test_overdue_requests_time_out_and_are_cancelled():
    registry = make_registry()
    add_instance(registry, b"a")
    request = registry.route(client(registry), "1", "echo.say", deadline=2, now=0)
    assert registry.next_deadline() == 2
    assert registry.expire_deadlines(now=1.999) == []
    assert registry.expire_deadlines(now=2.0) == [request]
    assert registry.in_flight == {}


def test_deadlines_fall_due_in_their_order_and_answered_ones_are_skipped():
    registry = make_registry()
    add_instance(registry, b"a", concurrency=10)
    caller = client(registry)
    late = registry.route(caller, "late", "echo.say", deadline=9, now=0)
    answered = registry.route(caller, "answered", "echo.say", deadline=1, now=0)
    soon = registry.route(caller, "soon", "echo.say", deadline=2, now=0)
    registry.complete(answered.instance.peer, answered.token, final=True)
    assert registry.next_deadline() == 1  # a stale entry: harmless, it is skipped
    assert registry.expire_deadlines(now=5) == [soon]
    assert registry.next_deadline() == 9
    assert registry.expire_deadlines(now=9) == [late]
    assert registry.next_deadline() is None


def test_a_vanished_caller_cancels_its_requests():
    registry = make_registry()
    service = add_instance(registry, b"a")
    request = registry.route(client(registry, now=0), "1", "echo.say", deadline=100, now=0)
    service.last_seen = 3.5
    failures, cancels = registry.expire_peers(now=3.5)
    assert cancels == [request]
    # and the caller, if it is alive but hung, is told why it was dropped rather than left waiting
    assert [(f.request, f.code) for f in failures] == [(request, ErrorCode.UNAVAILABLE)]
    assert "no heartbeat" in failures[0].message


def test_cancel_and_duplicate_ids():
    registry = make_registry()
    add_instance(registry, b"a")
    caller = client(registry)
    request = registry.route(caller, "1", "echo.say", 10, 0)
    with pytest.raises(BusError) as caught:
        registry.route(caller, "1", "echo.say", 10, 0)
    assert caught.value.code == ErrorCode.ALREADY_EXISTS
    assert registry.cancel(caller.key, "1") is request
    assert registry.cancel(caller.key, "1") is None
    assert request.instance.in_flight == 0


def test_partial_replies_keep_the_request_open():
    registry = make_registry()
    add_instance(registry, b"a")
    request = registry.route(client(registry), "1", "echo.say", 10, 0)
    server = request.instance.peer
    assert registry.complete(server, request.token, final=False) is request
    assert request.token in registry.in_flight
    assert registry.complete(server, request.token, final=True, error="INTERNAL") is request
    assert registry.per_service["echo"].errors == {"INTERNAL": 1}


def test_only_the_instance_a_request_went_to_can_answer_it():
    registry = make_registry()
    add_instance(registry, b"a")
    other = add_instance(registry, b"b", service="other", methods=("other.x",))
    caller = client(registry)
    request = registry.route(caller, "1", "echo.say", 10, 0)
    for impostor in (caller, other):
        assert registry.complete(impostor, request.token, final=True) is None
    assert request.token in registry.in_flight


@pytest.mark.parametrize("deadline", [float("nan"), float("inf")])
def test_deadlines_must_be_finite(deadline):
    registry = make_registry()
    add_instance(registry, b"a")
    with pytest.raises(BusError) as caught:
        registry.route(client(registry), "1", "echo.say", deadline, 0)
    assert caught.value.code == ErrorCode.INVALID_ARGUMENT
    assert registry.in_flight == {}


def test_event_log_keeps_the_last_n_and_replays_by_prefix():
    log = EventLog(capacity=3, max_bytes=1000)
    for n in range(5):
        log.append("container.started" if n % 2 else "session.created", "x", msgspec.msgpack.encode(n), now=n)
    assert log.first_seq == 3 and log.last_seq == 5
    assert [e.seq for e in log.replay(0, [], 10).events] == [3, 4, 5]
    assert [e.seq for e in log.replay(3, ["container."], 10).events] == [4]
    assert [e.seq for e in log.replay(0, [], 2).events] == [3, 4]
    assert log.replay(5, [], 10).events == []


def test_event_log_keeps_at_most_max_bytes_of_topics_and_bodies():
    log = EventLog(capacity=100, max_bytes=10)
    for n in range(5):
        log.append("x", "s", msgspec.msgpack.encode("123"), now=n)
    assert [e.seq for e in log.host.events] == [4, 5] and log.host.bytes == 10
    # one body over the cap is still kept, alone
    log.append("x", "s", msgspec.msgpack.encode("a" * 50), now=6)
    assert [e.seq for e in log.host.events] == [6]


def test_long_topics_count_against_the_event_history_budget():
    log = EventLog(capacity=10_000, max_bytes=1_000_000)
    for n in range(100):  # a peer may send topics of up to 64 KiB with an empty map for a body
        log.append("agent." + "x" * 60_000, "a", b"\x80", now=n)
    assert sum(len(e.topic) + len(e.body) for e in log.host.events) <= 1_000_000


@pytest.mark.parametrize(
    "body",
    [b"", b"\xc1", b"\x01\x02", b"\x92\x01", b"\xa3\xff\xfe\xfd", msgspec.msgpack.encode({"a": 1}) + b"\x00"],
    ids=["empty", "bad opcode", "two values", "truncated", "bad utf-8", "trailing byte"],
)
def test_the_event_log_refuses_a_body_that_is_not_one_msgpack_value(body):
    log = EventLog(capacity=10, max_bytes=1000)
    with pytest.raises(BusError) as caught:
        log.append("agent.x", "a", body, now=0)
    assert caught.value.code == ErrorCode.INVALID_ARGUMENT and caught.value.details == {"topic": "agent.x"}
    assert log.last_seq == 0 and not log.host.events


replay_reply = msgspec.msgpack.Decoder(ReplayResult)


@given(st.lists(st.binary(max_size=12), max_size=20))
def test_a_replay_reply_always_decodes_whatever_was_offered(bodies):
    log = EventLog(capacity=100, max_bytes=10_000)
    for body in bodies:
        try:
            log.append("agent.x", "a", body, now=0)
        except BusError:
            pass
    # and even an item that got into the history behind the log's back cannot poison the reply
    log.host.events.append(
        StampedEvent(seq=999, time=0, topic="agent.x", source="a", body=msgspec.Raw(b"\xc1"))
    )
    result = replay_reply.decode(
        msgspec.msgpack.encode(ReplayResult(events=log.replay(0, [], 1000).events, first_seq=1, last_seq=999))
    )
    for event in result.events:
        msgspec.msgpack.decode(event.body)  # each item decodes on its own too
    assert 999 not in [e.seq for e in result.events]


def test_an_instance_is_announced_up_once_and_down_when_its_last_registration_goes():
    registry = make_registry()
    first = add_instance(registry, b"a")
    add_instance(registry, b"a")  # the same connection registers again (the broker asked it to)
    reconnected = registry.touch((0, b"a2"), SERVICES_SOCKET, connection(), 0)
    registry.register(reconnected, Register(service="echo", instance="a", methods=["echo.say"]))
    assert registry.announcements == [ServiceUp(service="echo", instance="a")]
    registry.announcements.clear()
    registry.drop_peer(first.key, "disconnected")
    assert registry.announcements == []  # still registered through the new connection
    registry.drop_peer(reconnected.key, "disconnected")
    assert registry.announcements == [ServiceDown(service="echo", instance="a", reason="disconnected")]


def test_registering_again_answers_what_the_previous_instance_was_serving():
    registry = make_registry()
    peer = add_instance(registry, b"a")
    request = registry.route(client(registry), "1", "echo.say", 10, 0)
    _, failures = registry.register(peer, Register(service="echo", instance="a", methods=["echo.say"]))
    assert [(f.request, f.code) for f in failures] == [(request, ErrorCode.UNAVAILABLE)]


@pytest.mark.parametrize(
    "uid, role",
    [(1000, "operator"), (0, "operator"), (1001, "refused"), (65534, "refused"), (-1, "operator")],
)
def test_on_the_services_socket_only_the_hosts_uid_and_root_are_the_operator(uid, role):
    """-1: a tcp peer, judged by the TCP authentication instead."""
    assert host_role(Credentials(uid, uid, 1, 1), host_uid=1000) == role
