"""The runner's fair queue, driven as the connection's I/O thread drives it (no broker: requests
are handed to the runner as they arrive from one, replies recorded): callers take turns, an agent
runs at most its share of calls at once, a stream holds no share, and a caller's backlog is bounded.
An inline call is served where it arrives only when the fair queue would have let it run."""

from __future__ import annotations

import threading
import time
from typing import ClassVar, Iterator

import msgspec
import pytest

from baaaht.bus import wire
from baaaht.bus.runner import ServiceRunner
from baaaht.bus.service import Deferred, Service, rpc
from baaaht.bus.testing import Recorded
from baaaht.common.endpoints import Endpoints
from baaaht.schemas.base import Empty, Request
from baaaht.schemas.bus import Caller
from baaaht.schemas.config import BusConfig
from baaaht.schemas.errors import ErrorCode

AGENT_A = Caller(socket="agents", peer="a1", role="agent", session="s1", container="a" * 64)
AGENT_A_AGAIN = Caller(socket="agents", peer="a2", role="agent", session="s1", container="a" * 64)
AGENT_B = Caller(socket="agents", peer="b1", role="agent", session="s2", container="b" * 64)
OPERATOR = Caller(socket="services", peer="0p", role="operator")


class Hold(Request, tag="paced.hold", kw_only=True):
    response: ClassVar[type] = Empty
    name: str


class Follow(Request, tag="paced.follow", kw_only=True):
    response: ClassVar[type] = Empty
    name: str


class Note(Request, tag="paced.note", kw_only=True):
    response: ClassVar[type] = Empty
    name: str


class Promise(Request, tag="paced.promise", kw_only=True):
    response: ClassVar[type] = Empty
    name: str


class Paced(Service):
    """Each call runs until the test releases it by name; `note` and `promise` are inline: a note is
    answered at once, a promise when the test settles the Deferred it returned."""

    name = "paced"
    concurrency = 4

    def __init__(self):
        self.started: Recorded[str] = Recorded()
        self.releases: dict[str, threading.Event] = {}
        self.lock = threading.Lock()
        self.threads: dict[str, threading.Thread] = {}  # where each note and promise ran
        self.promised: dict[str, Deferred] = {}

    def release(self, name: str) -> None:
        self._gate(name).set()

    def _gate(self, name: str) -> threading.Event:
        with self.lock:
            return self.releases.setdefault(name, threading.Event())

    @rpc
    def hold(self, request: Hold) -> Empty:
        self.started.append(request.name)
        self._gate(request.name).wait(10)
        return Empty()

    @rpc(inline=True)
    def note(self, request: Note) -> Empty:
        self.threads[request.name] = threading.current_thread()
        self.started.append(request.name)
        return Empty()

    @rpc(inline=True)
    def promise(self, request: Promise) -> Deferred:
        self.threads[request.name] = threading.current_thread()
        self.promised[request.name] = Deferred()
        self.started.append(request.name)
        return self.promised[request.name]

    @rpc(stream=True)
    def follow(self, request: Follow) -> Iterator[Empty]:
        self.started.append(request.name)
        yield Empty()
        self._gate(request.name).wait(10)


class Driven:
    """A runner whose requests come from the test, replies recorded as (request id, error code)."""

    def __init__(self, run_dir: str, **limits):
        self.runner = ServiceRunner(Paced, Endpoints.for_config(BusConfig(run_dir=run_dir)), **limits)
        self.service = self.runner.service = Paced()
        self.replies: Recorded[tuple[str, str]] = Recorded()
        self.runner._reply = self._record
        self.tokens = 0

    def _record(self, kind, context, body, token, error=""):
        if kind == wire.REPLY:
            self.replies.append((context.request_id, error))

    def send(self, caller: Caller, request: Request, stream: bool = False, timeout: float = 30) -> None:
        """`request` as the broker hands it over: the envelope, then the token and the caller's stamp."""
        self.tokens += 1
        name = request.name
        target = type(request).__struct_config__.tag
        deadline = time.time() + timeout
        envelope = wire.request(name, target, deadline, "", stream, msgspec.msgpack.encode(request))
        token = self.tokens.to_bytes(wire.TOKEN_SIZE, "big")
        self.runner._on_message(wire.REQUEST, envelope, [token + wire.encode(caller)])

    def started(self, *names: str) -> None:
        self.service.started.wait_until(lambda s: set(names) <= set(s), what=f"{names} to start")

    def close(self) -> None:
        for gate in list(self.service.releases.values()):
            gate.set()
        self.runner._stop_handlers()
        self.runner.connection.close()


@pytest.fixture
def driven(tmp_path):
    made: list[Driven] = []

    def make(**limits) -> Driven:
        made.append(Driven(str(tmp_path), **limits))
        return made[-1]

    yield make
    for one in made:
        one.close()


def test_an_agent_runs_only_its_share_while_others_run_beside_it(driven):
    paced = driven(agent_running_per_caller=1)
    paced.send(AGENT_A, Hold(name="a1"))
    paced.started("a1")
    paced.send(AGENT_A_AGAIN, Hold(name="a2"))  # the same container on another connection: one caller
    paced.send(AGENT_B, Hold(name="b1"))
    paced.send(OPERATOR, Hold(name="o1"))
    paced.send(OPERATOR, Hold(name="o2"))  # host callers may use every thread
    paced.started("b1", "o1", "o2")
    assert "a2" not in paced.service.started
    paced.service.release("a1")
    paced.started("a2")
    paced.replies.wait_until(lambda r: ("a1", "") in r, what="a1 answered")


def test_a_stream_takes_its_turn_but_holds_no_share(driven):
    paced = driven(agent_running_per_caller=1)
    paced.send(AGENT_A, Follow(name="f1"), stream=True)
    paced.started("f1")
    paced.send(AGENT_A, Hold(name="beside"))
    paced.started("beside")  # the stream still runs: only the call holds the share


def test_a_callers_backlog_past_its_bound_is_refused_naming_the_limit(driven):
    paced = driven(agent_running_per_caller=1, queued_per_caller=2)
    refusals: list[str] = []
    paced.runner._reply = lambda kind, context, body, token, error="": refusals.append(
        (context.request_id, error, msgspec.msgpack.decode(body)["message"])
    )
    for name in ("a1", "a2", "a3", "a4"):  # a1 runs, a2 and a3 wait, a4 is one too many
        paced.send(AGENT_A, Hold(name=name))
        if name == "a1":
            paced.started("a1")
    [(request_id, code, message)] = refusals
    assert (request_id, code) == ("a4", ErrorCode.RESOURCE_EXHAUSTED.value)
    assert "limits.queued_per_caller" in message and "2 calls waiting" in message
    paced.send(AGENT_B, Hold(name="b1"))  # the bound is each caller's own
    paced.started("b1")
    assert len(refusals) == 1


# -- inline calls ----------------------------------------------------------------------------------

HOST_PEER = Caller(socket="services", peer="h1", role="service")


def test_an_inline_call_of_a_caller_with_nothing_waiting_is_answered_where_it_arrives(driven):
    paced = driven()
    paced.send(OPERATOR, Note(name="n1"))  # as the I/O thread hands it over: answered before it returns
    assert paced.service.threads["n1"] is threading.current_thread()
    assert paced.replies.snapshot() == [("n1", "")]


def test_an_agents_inline_call_takes_its_turn_in_the_fair_queue(driven):
    """Served where they arrive, an agent's calls would go in socket order: a flooding agent's ahead of
    everyone else's."""
    paced = driven()
    paced.send(AGENT_A, Note(name="n1"))
    paced.replies.wait_until(lambda r: ("n1", "") in r, what="n1 answered")
    assert paced.service.threads["n1"].name.startswith("paced-rpc-")


def test_an_inline_call_of_a_caller_at_its_share_waits_for_a_handler_thread(driven):
    paced = driven()
    held = [f"o{n}" for n in range(Paced.concurrency)]
    for name in held:
        paced.send(OPERATOR, Hold(name=name))
    paced.started(*held)
    paced.send(OPERATOR, Note(name="n1"))  # every one of the operator's shares is held
    assert "n1" not in paced.service.threads
    paced.send(HOST_PEER, Note(name="h1"))  # another caller's is free
    assert paced.service.threads["h1"] is threading.current_thread()
    paced.service.release("o0")
    paced.replies.wait_until(lambda r: ("n1", "") in r, what="n1 answered")
    assert paced.service.threads["n1"].name.startswith("paced-rpc-")


def test_an_inline_call_queues_behind_its_callers_waiting_calls(driven):
    paced = driven()
    for name in ("o1", "o2", "o3"):
        paced.send(OPERATOR, Hold(name=name))
    paced.send(HOST_PEER, Hold(name="h1"))
    paced.started("o1", "o2", "o3", "h1")  # every handler thread is busy
    paced.send(OPERATOR, Hold(name="o4"))  # below the operator's share, waiting for a thread
    paced.send(OPERATOR, Note(name="n1"))
    assert "n1" not in paced.service.started  # it comes after o4, as it was sent
    paced.service.release("h1")
    paced.started("o4")
    paced.service.release("o1")
    paced.started("n1")
    started = paced.service.started.snapshot()
    assert started.index("o4") < started.index("n1")


def test_an_inline_deferred_holds_its_callers_share_until_it_is_settled(driven):
    paced = driven()
    promises = [f"p{n}" for n in range(Paced.concurrency)]
    for name in promises:
        paced.send(OPERATOR, Promise(name=name))
        assert paced.service.threads[name] is threading.current_thread()
    assert paced.replies.snapshot() == []
    paced.send(OPERATOR, Note(name="n1"))
    assert "n1" not in paced.service.threads  # the promises still hold every share
    paced.service.promised["p0"].settle(Empty())  # from the thread that made the answer, as a committer
    paced.replies.wait_until(lambda r: ("p0", "") in r and ("n1", "") in r, what="p0 then n1 answered")
    assert paced.service.threads["n1"].name.startswith("paced-rpc-")


def test_an_inline_call_past_its_deadline_is_answered_timeout_without_running(driven):
    paced = driven()
    paced.send(OPERATOR, Note(name="late"), timeout=-1)
    assert paced.replies.snapshot() == [("late", ErrorCode.TIMEOUT.value)]
    assert "late" not in paced.service.started
