"""The worker agent end to end: tool calls submitted to the scheduler's `tools` queue start the session's
worker (a hardened agent-image container, by the real container manager), which runs them on the
session's workspace; results, errors, path escapes, runaway programs, isolation between sessions, and a
worker killed mid-call. One host and one worker per session for the module, where sharing does not
weaken a test."""

from __future__ import annotations

import os
import shutil

import pytest

from baaaht.bus.testing import Host
from baaaht.schemas.tools import (
    ToolEditFile,
    ToolGlob,
    ToolGrep,
    ToolListDir,
    ToolReadFile,
    ToolWriteFile,
)
from tests import container_support
from tests.worker_support import WorkerHost, settings

docker_client = container_support.docker_client

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def world(tmp_path_factory, docker_client, agent_image):
    host = Host(tmp_path_factory.mktemp("worker"), settings(agent_image))
    host.start_broker()
    made = None
    try:
        made = WorkerHost(host, docker_client)
        yield made
    finally:
        if made is not None:
            made.cleanup()
        host.stop()


@pytest.fixture(scope="module")
def session(world):
    """A session whose worker the module shares."""
    return world.session()


def test_the_first_tool_call_starts_the_sessions_worker_and_the_file_tools_work(world, session):
    written = world.output(
        session, ToolWriteFile(path="src/notes.txt", content="one\ntwo\nthree\n", create_dirs=True)
    )
    assert (written.size, written.created) == (14, True)
    assert (world.workspace(session) / "src" / "notes.txt").read_text() == "one\ntwo\nthree\n"
    (worker,) = world.workers(session)
    read = world.output(session, ToolReadFile(path="src/notes.txt", start_line=2, end_line=2))
    assert (read.content, read.start_line, read.end_line, read.size) == ("two\n", 2, 2, 14)
    edited = world.output(session, ToolEditFile(path="src/notes.txt", old="two", new="2"))
    assert edited.first_line == 2
    assert world.output(session, ToolReadFile(path="/workspace/src/notes.txt")).content == "one\n2\nthree\n"
    listed = world.output(session, ToolListDir(path="src"))
    assert [(e.name, e.kind, e.size) for e in listed.entries] == [("notes.txt", "file", 12)]
    assert world.output(session, ToolGlob(pattern="**/*.txt")).matches == ["src/notes.txt"]
    grep = world.output(session, ToolGrep(pattern="^t", context_lines=1))
    assert [(m.path, m.line, m.text, m.before) for m in grep.matches] == [
        ("src/notes.txt", 3, "three", ["2"])
    ]
    assert world.workers(session) == [worker]  # one worker served them all


@pytest.mark.parametrize(
    "call, code, says",
    [
        (ToolReadFile(path="missing.txt"), "NOT_FOUND", "does not exist"),
        (ToolWriteFile(path="no/such/dir/x", content=""), "NOT_FOUND", "does not exist"),
        (ToolEditFile(path="src/notes.txt", old="absent", new="x"), "FAILED_PRECONDITION", "0 times"),
        (ToolEditFile(path="src/notes.txt", old="e", new="x"), "FAILED_PRECONDITION", "times"),
        (ToolListDir(path="src/notes.txt"), "FAILED_PRECONDITION", "not a directory"),
        (ToolGrep(pattern="(unclosed"), "INVALID_ARGUMENT", "pattern"),
        (ToolReadFile(path="src"), "FAILED_PRECONDITION", "directory"),
    ],
)
def test_a_tool_error_fails_the_call_at_once_with_its_code(world, session, call, code, says):
    world.output(session, ToolWriteFile(path="src/notes.txt", content="one\ntwo\nthree\n", create_dirs=True))
    error_type, message = world.error(session, call)
    assert error_type == code and says in message, (error_type, message)


def test_paths_never_leave_the_workspace(world, session):
    root = world.workspace(session)
    os.symlink("/etc", root / "etc-link")
    (root / "d").mkdir(exist_ok=True)
    (root / "d" / "passwd").write_text("the workspace's own\n")
    for call in [
        ToolReadFile(path="etc-link/passwd"),
        ToolReadFile(path="../../etc/passwd"),
        ToolReadFile(path="/etc/passwd"),
        ToolWriteFile(path="etc-link/evil", content="x"),
        ToolListDir(path="etc-link"),
        ToolListDir(path=".."),
    ]:
        error_type, message = world.error(session, call)
        assert error_type in ("PERMISSION_DENIED", "FAILED_PRECONDITION"), (call, error_type, message)
    assert world.output(session, ToolReadFile(path="d/passwd")).content == "the workspace's own\n"
    # the directory swapped for a symlink to /etc between two calls
    shutil.rmtree(root / "d")
    os.symlink("/etc", root / "d")
    error_type, _ = world.error(session, ToolReadFile(path="d/passwd"))
    assert error_type in ("PERMISSION_DENIED", "FAILED_PRECONDITION")
    assert not os.path.exists("/etc/evil")
