"""The assistant end to end: real processes, real containers, the fake LLM behind the real egress proxy
(tests/assistant_e2e_support.py). A user message starts the session's assistant; a tool call it makes
starts the session's worker; the answer streams as session.partial events and is stored."""

from __future__ import annotations

import json
import os
import signal

import msgspec
import pytest

from baaaht.bus.testing import wait_for
from baaaht.bus.testing.fake_llm import call_tool, cut, pause, say, say_tool_result
from baaaht.schemas.base import session_topic
from baaaht.schemas.containers import ContainerList
from baaaht.schemas.sessions import SessionCancel, SessionMessages, SessionPartial
from baaaht.schemas.tasks import TaskSubmit
from baaaht.schemas.tools import TOOLS_QUEUE, ToolListDir
from tests import container_support
from tests.assistant_e2e_support import ANSWER_TIMEOUT, AssistantHost

docker_client = container_support.docker_client

pytestmark = pytest.mark.docker

READ_NOTES = [
    [say("Let me look."), call_tool("read_file", path="notes.txt")],
    [say("It starts with: "), say_tool_result("content", line=1)],
]


@pytest.fixture
def make_assistant_host(make_host, docker_client, agent_image, tmp_path):
    made: list[AssistantHost] = []

    def make(**settings) -> AssistantHost:
        made.append(
            AssistantHost(make_host, docker_client, agent_image, tmp_path / f"a{len(made)}", **settings)
        )
        return made[-1]

    yield make
    for host in made:
        host.cleanup()


def test_a_question_is_answered_with_a_file_the_worker_read_streamed_in_order(make_assistant_host):
    world = make_assistant_host(script=READ_NOTES)
    session_id = world.session()
    world.put_file(session_id, "notes.txt", "the first line\nthe second line\n")
    bus = world.bus
    with bus.subscribe([session_topic(SessionPartial, session_id)], since=0) as partials:
        asked = world.ask(session_id, "What does notes.txt start with?")
        answer = world.answer(session_id, asked)
        streamed = []
        while (delivery := partials.next(timeout=1.0)) is not None:
            streamed.append(delivery.event)
    assert answer[-1].metadata.turn_end == "done"
    assert answer[-1].content == "It starts with: the first line"
    assert [p.seq for p in streamed] == sorted(p.seq for p in streamed)  # in order, per turn
    texts = "".join(p.text for p in streamed if p.kind == "text")
    assert "Let me look." in texts and "the first line" in texts
    assert any(p.kind == "tool_call" and "read_file" in p.text for p in streamed)
    assert any(p.kind == "tool_result" for p in streamed)
    # The assistant stored its message asking for the tool before the tool ran.
    stored = bus.call(SessionMessages(session_id=session_id)).messages
    roles = [m.role for m in stored]
    assert roles[0] == "user" and roles.index("assistant") < roles.index("tool")
    # Both agents are the session's, hardened by the policy's defaults.
    (assistant,) = world.containers(session_id, "assistant")
    (worker,) = world.containers(session_id, "worker")
    config = world.docker.api.inspect_container(assistant)
    assert config["Config"]["User"] == "1000:1000"
    assert config["HostConfig"]["ReadonlyRootfs"] is True
    assert config["HostConfig"]["CapDrop"] == ["ALL"]
    assert config["HostConfig"]["NetworkMode"] == "none"
    assert any(o.startswith("no-new-privileges") for o in config["HostConfig"]["SecurityOpt"])
    assert worker != assistant


def test_two_sessions_at_once_stay_apart(make_assistant_host):
    world = make_assistant_host()  # the fake model's plain streamed reply, for both
    first, second = world.session(), world.session()
    asked = {
        first: world.ask(first, "hello from the first"),
        second: world.ask(second, "hello from the second"),
    }
    answers = {s: world.answer(s, m) for s, m in asked.items()}
    for session_id, messages in answers.items():
        assert messages[-1].metadata.turn_end == "done"
        stored = world.bus.call(SessionMessages(session_id=session_id)).messages
        users = [m.content for m in stored if m.role == "user"]
        assert users == [asked[session_id].content]  # nothing of the other session
    assert set(world.containers(first, "assistant")).isdisjoint(world.containers(second, "assistant"))
    # Each assistant's model call carried only its own session's conversation.
    bodies = [json.loads(r.body) for r in world.llm.requests if r.path == "/v1/messages"]
    for body in bodies:
        text = json.dumps(body["messages"])
        assert ("the first" in text) != ("the second" in text)


def test_cancel_mid_stream_ends_the_turn_cancelled(make_assistant_host):
    world = make_assistant_host(script=[[say("Once upon a time"), pause(30), say("the end")]])
    session_id = world.session()
    asked = world.ask_until_it_streams(session_id, "Tell me a long story")
    world.bus.call(SessionCancel(session_id=session_id))
    answer = world.answer(session_id, asked, timeout=30)
    assert answer[-1].metadata.turn_end == "cancelled"
    assert "the end" not in answer[-1].content


def test_a_provider_error_mid_stream_is_a_visible_failed_turn(make_assistant_host):
    cut_each_time = [[say("Half an"), cut()]] * 5  # every retry is cut too
    world = make_assistant_host(script=cut_each_time)
    session_id = world.session()
    answer = world.answer(session_id, world.ask(session_id, "hi"))
    assert answer[-1].metadata.turn_end == "failed"
    assert answer[-1].content  # says what happened


def test_without_a_credential_the_answer_says_what_to_configure(make_assistant_host):
    world = make_assistant_host(credential=False)
    session_id = world.session()
    answer = world.answer(session_id, world.ask(session_id, "hi"))
    assert answer[-1].metadata.turn_end == "failed"
    assert "baaaht-ctl credentials add anthropic" in answer[-1].content
    assert world.llm.requests == []  # nothing reached the upstream


def test_a_killed_assistant_is_restarted_and_the_turn_is_answered_once(make_assistant_host):
    world = make_assistant_host(script=[[say("Thinking"), pause(30), say("never seen")]])
    session_id = world.session()
    asked = world.ask_until_it_streams(session_id, "a question")
    (first,) = world.containers(session_id, "assistant")
    world.docker.api.kill(first, signal="SIGKILL")
    wait_for(
        lambda: [c for c in world.containers(session_id, "assistant") if c != first],
        timeout=ANSWER_TIMEOUT,
        what="a new assistant",
    )
    answer = world.answer(session_id, asked)
    assert answer[-1].metadata.turn_end in ("done", "failed")
    ended = [
        m
        for m in world.bus.call(SessionMessages(session_id=session_id)).messages
        if m.metadata.reply_to == asked.id and m.metadata.turn_end
    ]
    assert len(ended) == 1  # completed or marked failed, never twice


def test_autostart_off_starts_no_assistant(make_assistant_host):
    world = make_assistant_host(assistant={"autostart": False})
    session_id = world.session()
    world.ask(session_id, "anyone?")
    # A tool call after it starts the session's worker: by then an assistant the message had asked for
    # would have been started first (the container manager starts its session agents in order).
    tool = msgspec.msgpack.encode(ToolListDir(path="."))
    world.bus.call(TaskSubmit(queue=TOOLS_QUEUE, task_type="list_dir", payload=tool, session_id=session_id))
    wait_for(lambda: world.containers(session_id, "worker"), timeout=ANSWER_TIMEOUT, what="the worker")
    listed = world.bus.call(ContainerList(session_id=session_id)).containers
    assert [c.role for c in listed] == ["worker"]


def test_a_message_sent_while_the_container_manager_was_down_is_answered_once_it_is_back(make_assistant_host):
    world = make_assistant_host()
    session_id = world.session()
    world.host.kill("container", signal.SIGTERM)
    asked = world.ask(session_id, "are you there?")
    world.host.start_service("baaaht.services.containers", "container")
    answer = world.answer(session_id, asked)
    assert answer[-1].metadata.turn_end == "done"


def test_a_custom_image(make_assistant_host, docker_client, agent_image):
    custom = "baaaht-e2e/assistant:custom"
    docker_client.images.get(agent_image).tag(custom)
    try:
        world = make_assistant_host(assistant={"image": custom})
        session_id = world.session()
        answer = world.answer(session_id, world.ask(session_id, "hi"))
        assert answer[-1].metadata.turn_end == "done"
        (assistant,) = world.containers(session_id, "assistant")
        assert world.docker.api.inspect_container(assistant)["Config"]["Image"] == custom
    finally:
        docker_client.images.remove(custom)  # the tag only: the agent image stays


DEV_PROBE = ["-c", "import time; print(open('hello.txt').read(), flush=True); time.sleep(600)"]


def dev_mode_policy(directory, allowed) -> str:
    policy = directory / "policy.yaml"
    policy.write_text(
        "mounts:\n  allow_bind: true\n  allowlist:\n"
        f"    - path: {allowed}\n      mode: readonly\n"
        "security:\n  require_read_only_rootfs: false\n"
    )
    return str(policy)


def test_dev_mode_mounts_a_source_the_policy_allows(make_assistant_host, tmp_path):
    source = tmp_path / "allowed" / "src"
    source.mkdir(parents=True)
    (source / "hello.txt").write_text("hello from the dev source")
    os.chmod(source, 0o755)
    assistant = {
        "dev_mode": True,
        "dev_source": str(source),
        "readonly_rootfs": False,
        "command": "python3",
        "args": DEV_PROBE,
    }
    world = make_assistant_host(
        assistant=assistant, policy_path=dev_mode_policy(tmp_path, tmp_path / "allowed")
    )
    session_id = world.session()
    world.ask(session_id, "start")
    (container,) = wait_for(
        lambda: world.containers(session_id, "assistant"), timeout=ANSWER_TIMEOUT, what="the assistant"
    )
    wait_for(
        lambda: b"hello from the dev source" in world.docker.api.logs(container),
        timeout=60,
        what="the dev source read in the container",
    )
    inspected = world.docker.api.inspect_container(container)
    assert inspected["HostConfig"]["ReadonlyRootfs"] is False
    assert inspected["Config"]["WorkingDir"] == "/app"
    assert "writable root filesystem: a development exception" in world.host.log("container")


def test_dev_mode_with_a_source_the_policy_refuses_starts_nothing_and_says_why(make_assistant_host, tmp_path):
    source = tmp_path / "elsewhere"
    source.mkdir()
    assistant = {"dev_mode": True, "dev_source": str(source), "command": "python3", "args": DEV_PROBE}
    world = make_assistant_host(
        assistant=assistant, policy_path=dev_mode_policy(tmp_path, tmp_path / "allowed")
    )
    session_id = world.session()
    world.ask(session_id, "start")
    wait_for(
        lambda: "could not be started" in world.host.log("container"),
        timeout=60,
        what="the refused start in the container manager's log",
    )
    assert str(source) in world.host.log("container")
    assert world.containers(session_id, "assistant") == []
