"""The session manager end to end: a real broker, the real session service process, and a test
double of the container manager on the bus (tests/services/fake_containers.py)."""

from __future__ import annotations

import threading

import msgspec
import pytest

from baaaht.bus.errors import BusError
from baaaht.bus.testing import error_of
from baaaht.schemas.containers import ContainerCreate, ContainerList, ContainerSpec
from baaaht.schemas.errors import ErrorCode
from baaaht.schemas.sessions import (
    SessionAttachContainer,
    SessionClose,
    SessionCreate,
    SessionDelete,
    SessionGet,
    SessionList,
    SessionMessages,
    SessionSendMessage,
    SessionSettings,
    SessionState,
    SessionUpdate,
)
from tests.session_doubles import SESSIONS, start_sessions_host, wait_for_state

S = SessionState


@pytest.fixture
def sessions(make_host):
    """The session service and the container double; sessions go idle after the default 30m."""
    return start_sessions_host(make_host)


def state_of(client, session_id: str) -> SessionState:
    return client.call(SessionGet(session_id=session_id)).state


def transitions_until(client, done) -> dict[str, list[tuple[str, str]]]:
    """(from, to) of every `session.updated` state change, by session, in order, read until
    `done(seen)` holds (each wait for the next event bounded)."""
    seen: dict[str, list[tuple[str, str]]] = {}
    with client.subscribe(["session.updated"], since=0) as subscription:
        while not done(seen):
            delivery = subscription.next(timeout=10)
            assert delivery is not None, f"no further session.updated event after {seen}"
            event = delivery.event
            if event.change == "state":
                seen.setdefault(event.session.id, []).append(
                    (event.previous_state.value, event.session.state.value)
                )
    return seen


def all_messages(client, session_id: str) -> list:
    found, cursor = [], 0
    while True:
        page = client.call(SessionMessages(session_id=session_id, limit=1000, cursor=cursor))
        found += page.messages
        if not (cursor := page.next_cursor):
            return found


def create_container(client, session_id: str, name: str = "") -> str:
    spec = ContainerSpec(image="busybox:1", name=name)
    return client.call(ContainerCreate(spec=spec, session_id=session_id)).id


def test_every_valid_transition_and_every_refused_one(make_host):
    # Sessions go idle after 300 ms of quiet, however busy the machine: a step that needs its session
    # to stay active uses one with a long idle timeout, and states are read from the events.
    host = start_sessions_host(make_host, {"timeout": "300ms"})
    client = host.client()
    # initializing -> active
    created = client.call(SessionCreate(owner="alice"))
    assert created.state is S.ACTIVE
    # active -> idle (the sweep) and idle -> active (a message)
    wait_for_state(client, created.id, S.IDLE, "the session to go idle")
    client.call(SessionSendMessage(session_id=created.id, content="wake up"))
    # active -> closing -> closed, with a container that will not go away
    session_id = client.call(SessionCreate(owner="alice", settings=SessionSettings(idle_timeout=3600))).id
    stuck = create_container(client, session_id, name="stuck-1")
    client.call(SessionAttachContainer(session_id=session_id, container_id=stuck))
    assert client.call(SessionClose(session_id=session_id, wait=False)).state is S.CLOSING
    # closing -> active is refused
    error = error_of(lambda: client.call(SessionSendMessage(session_id=session_id, content="x")))
    assert error.code is ErrorCode.FAILED_PRECONDITION
    assert f"session {session_id} is closing" in error.message
    wait_for_state(client, session_id, S.CLOSED, "the session to close")
    # closed -> active is refused; closed -> closing is not a transition: close is idempotent
    error = error_of(lambda: client.call(SessionSendMessage(session_id=session_id, content="x")))
    assert (error.code, error.details["state"]) == (ErrorCode.FAILED_PRECONDITION, "closed")
    assert error.message == f"session {session_id} is closed: it takes no more messages"
    assert client.call(SessionClose(session_id=session_id)).state is S.CLOSED
    # idle -> closing -> closed
    other = client.call(SessionCreate(owner="alice")).id
    wait_for_state(client, other, S.IDLE, "the third session to go idle")
    assert client.call(SessionClose(session_id=other)).state is S.CLOSED

    def all_in(seen) -> bool:
        return len(seen.get(created.id, [])) >= 2 and seen.get(other, [])[-1:] == [("closing", "closed")]

    # The woken session goes idle again whenever the sweep finds it quiet: its first two are checked.
    seen = transitions_until(client, all_in)
    assert seen[created.id][:2] == [("active", "idle"), ("idle", "active")]
    assert seen[session_id] == [("active", "closing"), ("closing", "closed")]
    assert seen[other] == [("active", "idle"), ("idle", "closing"), ("closing", "closed")]


def test_closing_removes_the_sessions_containers_and_reports_what_would_not_go(sessions):
    client = sessions.client()
    session_id = client.call(SessionCreate(owner="alice")).id
    keep = client.call(SessionCreate(owner="bob")).id
    attached = create_container(client, session_id)
    client.call(SessionAttachContainer(session_id=session_id, container_id=attached))
    unattached = create_container(client, session_id)  # found by container.list, not attached
    bystander = create_container(client, keep)
    info = client.call(SessionClose(session_id=session_id, reason="done"), timeout=10)
    assert (info.state, info.close_reason, info.containers) == (S.CLOSED, "done", [])
    assert client.call(ContainerList(session_id=session_id)).containers == []
    assert [c.id for c in client.call(ContainerList()).containers] == [bystander]
    with client.subscribe(["container.removed", "session.closed"], since=0) as subscription:
        seen = [subscription.next(timeout=2) for _ in range(3)]
    removed = {d.event.container_id for d in seen if d.topic == f"container.removed/{session_id}"}
    assert removed == {attached, unattached}
    assert [
        (d.event.session_id, d.event.remaining_containers)
        for d in seen
        if d.topic == f"session.closed/{session_id}"
    ] == [(session_id, [])]
    # A container that does not go away is reported and left to the container manager's reconcile.
    stuck_session = client.call(SessionCreate(owner="carol")).id
    stuck = create_container(client, stuck_session, name="stuck-1")
    info = client.call(SessionClose(session_id=stuck_session), timeout=10)
    assert info.state is S.CLOSED
    assert [c.id for c in client.call(ContainerList(session_id=stuck_session)).containers] == [stuck]


def test_limits_on_sessions_and_containers(sessions):
    client = sessions.client()
    created = [client.call(SessionCreate(owner="alice")).id for _ in range(4)]
    error = error_of(lambda: client.call(SessionCreate(owner="alice")))
    assert error.code is ErrorCode.RESOURCE_EXHAUSTED
    assert "session.max_sessions is 4" in error.message
    client.call(SessionClose(session_id=created[0]))
    session_id = client.call(SessionCreate(owner="alice")).id
    for n in range(2):
        client.call(SessionAttachContainer(session_id=session_id, container_id=f"c{n}"))
    error = error_of(lambda: client.call(SessionAttachContainer(session_id=session_id, container_id="c2")))
    assert error.code is ErrorCode.RESOURCE_EXHAUSTED
    error = error_of(
        lambda: client.call(SessionCreate(owner="a", settings=SessionSettings(max_containers=3)))
    )
    assert error.code is ErrorCode.INVALID_ARGUMENT
    assert "policy.max_containers=2" in error.message


def test_paging_sessions_and_messages(sessions):
    client = sessions.client()
    session_ids = [client.call(SessionCreate(owner="alice", labels={"n": str(n)})).id for n in range(4)]
    seen, cursor = [], 0
    while True:
        page = client.call(SessionList(limit=3, cursor=cursor))
        seen += [s.id for s in page.sessions]
        if not (cursor := page.next_cursor):
            break
    assert seen == session_ids
    assert [s.id for s in client.call(SessionList(labels={"n": "2"})).sessions] == [session_ids[2]]
    for n in range(7):
        client.call(SessionSendMessage(session_id=session_ids[0], content=f"m{n}"))
    newest, cursor = [], 0
    while True:
        page = client.call(SessionMessages(session_id=session_ids[0], order="newest", limit=2, cursor=cursor))
        newest += [m.content for m in page.messages]
        if not (cursor := page.next_cursor):
            break
    assert newest == [f"m{n}" for n in reversed(range(7))]


def test_expiry_closes_the_session_and_removes_its_containers(sessions):
    client = sessions.client()
    session_id = client.call(SessionCreate(owner="alice", settings=SessionSettings(max_duration=0.5))).id
    container_id = create_container(client, session_id)
    client.call(SessionAttachContainer(session_id=session_id, container_id=container_id))
    info = wait_for_state(client, session_id, S.CLOSED, "the session to expire")
    assert info.close_reason.startswith("expired")
    assert client.call(ContainerList(session_id=session_id)).containers == []


def test_bad_input_gets_a_clear_error_and_changes_nothing(sessions):
    client = sessions.client()
    session_id = client.call(SessionCreate(owner="alice", name="keep")).id
    client.call(SessionSendMessage(session_id=session_id, content="first"))
    before = client.call(SessionGet(session_id=session_id))

    error = error_of(
        lambda: client.call_raw(
            "session.send_message",
            msgspec.msgpack.encode({"session_id": session_id, "role": "root", "content": "x"}),
        )
    )
    assert (error.code, error.details) == (ErrorCode.INVALID_ARGUMENT, {"path": "$.role"})
    assert "Invalid enum value 'root'" in error.message
    error = error_of(lambda: client.call(SessionSendMessage(session_id=session_id, content="x" * 5000)))
    assert error.code is ErrorCode.INVALID_ARGUMENT
    assert "more than session.max_message_size=4096" in error.message
    error = error_of(lambda: client.call(SessionSendMessage(session_id="no-such-session", content="x")))
    assert (error.code, error.message) == (ErrorCode.NOT_FOUND, "no session no-such-session")
    error = error_of(lambda: client.call(SessionUpdate(session_id=session_id, labels={"": "x"})))
    assert error.code is ErrorCode.INVALID_ARGUMENT
    error = error_of(lambda: client.call(SessionDelete(session_id=session_id)))
    assert error.code is ErrorCode.FAILED_PRECONDITION
    error = error_of(lambda: client.call_raw("session.get", msgspec.msgpack.encode({"session_id": 7})))
    assert (error.code, error.details) == (ErrorCode.INVALID_ARGUMENT, {"path": "$.session_id"})
    error = error_of(lambda: client.call(SessionGet(session_id="../" + session_id)))
    assert (error.code, error.details) == (ErrorCode.INVALID_ARGUMENT, {"path": "$.session_id"})

    assert client.call(SessionGet(session_id=session_id)) == before
    messages = client.call(SessionMessages(session_id=session_id)).messages
    assert [m.content for m in messages] == ["first"]


def test_concurrent_writers_keep_one_order_and_followers_see_it(sessions):
    session_id = sessions.client().call(SessionCreate(owner="alice")).id
    writers, each = 8, 15
    acknowledged: dict[int, list[int]] = {}

    def write(writer: int) -> None:
        client = sessions.client()
        acknowledged[writer] = [
            client.call(SessionSendMessage(session_id=session_id, content=f"{writer}:{n}")).seq
            for n in range(each)
        ]

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    total = writers * each
    stored = all_messages(sessions.client(), session_id)
    assert [m.seq for m in stored] == list(range(1, total + 1))
    for writer, seqs in acknowledged.items():
        assert [stored[seq - 1].content for seq in seqs] == [f"{writer}:{n}" for n in range(each)]
    with sessions.client().subscribe([f"session.message/{session_id}"], since=0) as subscription:
        followed = [subscription.next(timeout=2).event.message.seq for _ in range(total)]
    assert followed == list(range(1, total + 1))


def test_kill_9_mid_write_loses_nothing_acknowledged_and_leaves_nothing_half_written(make_host):
    host = start_sessions_host(make_host, {"timeout": "1s"}, with_containers=False)
    setup = host.client()
    session_id = setup.call(SessionCreate(owner="alice")).id
    idle_one = setup.call(SessionCreate(owner="bob")).id
    setup.call(SessionSendMessage(session_id=idle_one, content="before"))
    wait_for_state(setup, idle_one, S.IDLE, "the second session to go idle")
    writers = 8
    acknowledged: dict[str, int] = {}
    attempted: set[str] = set()
    lock = threading.Lock()
    stop = threading.Event()
    going = threading.Event()  # 200 messages acknowledged

    def write(writer: int) -> None:
        client = host.client(timeout=2)
        n = 0
        while not stop.is_set():
            content = f"writer {writer} message {n} " + "x" * (n % 97)
            with lock:
                attempted.add(content)
            try:
                message = client.call(SessionSendMessage(session_id=session_id, content=content))
            except BusError:
                return  # the service is gone: what was not acknowledged may or may not be stored
            with lock:
                acknowledged[content] = message.seq
                if len(acknowledged) >= 200:
                    going.set()
            n += 1

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for thread in threads:
        thread.start()
    assert going.wait(30), "timed out after 30s waiting for the writers to get 200 messages acknowledged"
    host.kill("session")  # SIGKILL while writes are in flight
    stop.set()
    for thread in threads:
        thread.join(30)
    host.start_service(SESSIONS, "session")
    client = host.client()
    stored = all_messages(client, session_id)
    by_content = {m.content: m.seq for m in stored}
    assert len(acknowledged) >= 200
    assert all(by_content.get(content) == seq for content, seq in acknowledged.items())
    assert [m.seq for m in stored] == list(range(1, len(stored) + 1))
    assert {m.content for m in stored} <= attempted
    info = client.call(SessionGet(session_id=session_id))
    assert info.message_count == len(stored)
    # State and clocks came back: the idle session is still idle, the busy one goes idle on time.
    assert state_of(client, idle_one) is S.IDLE
    wait_for_state(client, session_id, S.IDLE, "the written session to go idle")
    assert [m.content for m in client.call(SessionMessages(session_id=idle_one)).messages] == ["before"]
    # And the service takes writes again.
    assert client.call(SessionSendMessage(session_id=session_id, content="after")).seq == len(stored) + 1
