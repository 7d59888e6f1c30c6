"""The worker agent end to end: tool calls submitted to the scheduler's `tools` queue start the session's
worker (a hardened agent-image container, by the real container manager), which runs them on the
session's workspace; results, errors, path escapes, runaway programs, isolation between sessions, and a
worker killed mid-call. One host and one worker per session for the module, where sharing does not
weaken a test."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from baaaht.bus.testing import Host, wait_for
from baaaht.schemas.tasks import RetryPolicy, TaskCancel, TaskList, TaskState
from baaaht.schemas.tools import (
    OUTPUT_DECODER,
    TOOLS,
    ToolEditFile,
    ToolExec,
    ToolExecResult,
    ToolFetch,
    ToolGlob,
    ToolGrep,
    ToolListDir,
    ToolReadFile,
    ToolWriteFile,
    tool_name,
)
from tests import container_support, ctl_runner
from tests.test_tools_container import NETWORK
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
        (ToolExec(argv=["no-such-program"]), "NOT_FOUND", "was not found"),
        (ToolExec(argv=["true"], cwd="../elsewhere"), "PERMISSION_DENIED", "`..`"),
        (ToolExec(argv=["true"], cwd="missing"), "NOT_FOUND", "does not exist"),
        (ToolFetch(url="https://example.com/"), "PERMISSION_DENIED", "not a route of the egress proxy"),
        # no credential service in this host: nothing listens on the egress socket
        (ToolFetch(url="http://egress/anything/x"), "UNAVAILABLE", "egress proxy is not listening"),
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


SLEEPERS = """
import os
def command(pid):
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read()
    except OSError:
        return b""
print(sum(1 for pid in os.listdir("/proc") if pid.isdigit() and command(pid).startswith(b"sleep\\0")))
"""


def exec_output(world, session, argv, **fields) -> tuple[ToolExecResult, str]:
    task_id = world.submit(session, ToolExec(argv=argv, **fields))
    info = world.finished(task_id)
    assert info.state is TaskState.SUCCEEDED, (info.state, info.error_type, info.error)
    result = OUTPUT_DECODER.decode(info.result)
    text = world.all_output(session, task_id) if result.stdout_bytes or result.stderr_bytes else ""
    return result, text


def running_worker(world, session) -> str:
    """The session's worker, started by a tool call when this test is the first to need it (run alone)."""
    world.output(session, ToolListDir())
    return world.worker(session)


def test_exec_has_no_network_but_lo_and_no_dns(world, session):
    result, text = exec_output(world, session, ["python3", "-c", NETWORK])
    assert result.exit_code == 0 and text.split() == ["lo", "no-dns"]


def test_a_command_printing_gigabytes_is_capped_and_the_worker_survives(world, session):
    worker = running_worker(world, session)
    result, text = exec_output(world, session, ["head", "-c", str(2 * 1024**3), "/dev/zero"], timeout=300)
    assert result.exit_code == 0 and result.stdout_bytes == 2 * 1024**3 and result.stdout_truncated
    assert len(text) < 2 * 1024 * 1024 and "[stdout truncated after 1048576 bytes]" in text
    assert exec_output(world, session, ["echo", "still here"])[1] == "still here\n"
    assert world.workers(session) == [worker]


def test_a_fork_bomb_meets_the_pids_limit_and_the_worker_survives(world, session):
    worker = running_worker(world, session)
    result, text = exec_output(world, session, ["sh", "-c", "b() { b | b & }; b; sleep 3"], timeout=10)
    # The bomb may fill the limit before the shell forks its own `sleep`: then the shell fails that fork.
    assert result.exit_code == 0 or result.timed_out or (result.exit_code == 2 and "fork" in text.lower())
    assert exec_output(world, session, ["python3", "-c", SLEEPERS])[1] == "0\n"
    assert exec_output(world, session, ["echo", "still here"])[1] == "still here\n"
    assert world.workers(session) == [worker]


def test_a_command_ignoring_sigterm_is_killed_at_the_hard_timeout(world, session):
    result, _ = exec_output(world, session, ["sh", "-c", "trap '' TERM; sleep 60"], timeout=1, kill_after=1)
    assert result.timed_out and result.exit_code == -9 and result.duration < 30


def test_cancelling_a_running_exec_kills_its_process_group(world, session):
    script = "sleep 300 & sleep 300 & echo started; wait"
    task_id = world.submit(session, ToolExec(argv=["sh", "-c", script]))
    world.output_of(session, task_id, "started")
    world.bus.call(TaskCancel(id=task_id, reason="the test is done with it"))
    assert world.finished(task_id).state is TaskState.CANCELLED
    counted = wait_for(
        lambda: (text := exec_output(world, session, ["python3", "-c", SLEEPERS])[1]) == "0\n" and text,
        30,
        interval=0.5,
        what="the cancelled exec's sleepers to be gone",
    )
    assert counted == "0\n"


def test_two_sessions_never_reach_each_others_workspace_or_tasks(world, session):
    other = world.session()
    world.output(session, ToolWriteFile(path="secret.txt", content="only mine"))
    mine = world.worker(session)
    # The other session's calls wait for its own worker, though this one has slots free.
    listed = world.output(other, ToolListDir())
    theirs = world.worker(other)
    assert mine != theirs and listed.entries == []
    host_path = str(world.workspace(session) / "secret.txt")
    assert world.error(other, ToolReadFile(path=host_path))[0] == "PERMISSION_DENIED"
    assert world.error(other, ToolReadFile(path="../" + session + "/secret.txt"))[0] == "PERMISSION_DENIED"
    for path in (host_path, "/workspace/secret.txt"):
        result, text = exec_output(world, other, ["cat", path])
        assert result.exit_code != 0 and "only mine" not in text, (path, text)
    world.output(other, ToolWriteFile(path="secret.txt", content="theirs"))
    assert (world.workspace(session) / "secret.txt").read_text() == "only mine"
    for owner, worker in [(session, mine), (other, theirs)]:
        tasks = world.bus.call(TaskList(queue="tools", session_id=owner, limit=1000)).tasks
        served = {attempt.worker for task in tasks for attempt in task.attempts}
        assert served and all(w.startswith(worker[:12]) for w in served), (owner, served)


def test_a_worker_killed_mid_call_is_replaced_and_the_call_retried_on_the_intact_workspace(world, session):
    world.output(session, ToolWriteFile(path="kept.txt", content="before the kill"))
    worker = world.worker(session)
    retry = RetryPolicy(maximum_attempts=2, initial_interval=0.5)
    argv = ["sh", "-c", "echo started; sleep 5; echo done > finished.txt"]
    task_id = world.submit(session, ToolExec(argv=argv), retry=retry)
    world.output_of(session, task_id, "started")
    world.docker.containers.get(worker).kill(signal="SIGKILL")
    info = world.finished(task_id)
    assert info.state is TaskState.SUCCEEDED and len(info.attempts) == 2, (info.state, info.attempts)
    replacement = world.worker(session)
    assert replacement != worker
    assert info.attempts[0].worker.startswith(worker[:12]) and info.attempts[1].worker.startswith(
        replacement[:12]
    )
    assert (world.workspace(session) / "kept.txt").read_text() == "before the kill"
    assert (world.workspace(session) / "finished.txt").read_text() == "done\n"


def test_ctl_tools_run_streams_exec_output_live_and_exits_with_the_programs_code(world, session):
    done = ctl_runner.run(
        world.host,
        "tools",
        "run",
        session,
        "exec",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 3",
        timeout=150,
    )
    assert (done.returncode, done.stdout, done.stderr) == (3, "out\n", "err\n")
    script = "echo first; while [ ! -e release ]; do sleep 0.1; done; echo second"
    process = ctl_runner.popen(world.host, "tools", "run", session, "exec", "--", "sh", "-c", script)
    try:
        next_line = ctl_runner.line_reader(process, "tools run's output")
        assert next_line() == "first\n"  # shown while the program still runs
        (world.workspace(session) / "release").write_text("")
        assert next_line() == "second\n"
        assert process.wait(60) == 0
    finally:
        ctl_runner.reap(process)


def test_ctl_tools_run_file_tools_their_errors_and_json(world, session):
    wrote = ctl_runner.run(
        world.host, "tools", "run", session, "write_file", "ctl.txt", "--from-stdin", stdin="a\nb\n"
    )
    assert wrote.returncode == 0, wrote.stderr
    read = ctl_runner.run(world.host, "tools", "run", session, "read_file", "ctl.txt", "-a", "start_line=2")
    assert (read.returncode, read.stdout) == (0, "b\n")
    listed = ctl_runner.run(world.host, "tools", "run", session, "list_dir", "--json")
    assert listed.returncode == 0 and "ctl.txt" in [e["name"] for e in json.loads(listed.stdout)["entries"]]
    missing = ctl_runner.run(world.host, "tools", "run", session, "read_file", "nope.txt")
    assert missing.returncode == 1 and "error NOT_FOUND: path 'nope.txt' does not exist" in missing.stderr
    bad = ctl_runner.run(world.host, "tools", "run", session, "read_file", "-a", "start_line=0", "x")
    assert bad.returncode != 0 and "start_line" in bad.stderr
    tools = ctl_runner.run(world.host, "tools", "list", "--json")
    assert [t["name"] for t in json.loads(tools.stdout)] == [tool_name(call) for call in TOOLS]


def test_a_session_going_idle_has_its_worker_removed(world):
    idle = world.session(idle_timeout=15.0)
    world.output(idle, ToolListDir())
    worker = world.worker(idle)
    wait_for(lambda: not world.workers(idle), 90, interval=0.5, what="the idle session's worker to go")
    wait_for(
        lambda: world.docker.containers.list(all=True, filters={"id": worker}) == [],
        30,
        interval=0.5,
        what="the engine to have removed the idle session's worker",
    )


def test_a_restarted_container_manager_keeps_its_workers_and_serves_the_calls_it_missed(world, session):
    world.output(session, ToolWriteFile(path="before-restart.txt", content="x"))
    worker = world.worker(session)
    fresh = world.session()
    world.host.kill("baaaht.services.containers")
    # Queued while nobody listened for task.queued: the sweep finds them.
    missed = [
        world.submit(session, ToolReadFile(path="before-restart.txt")),
        world.submit(fresh, ToolListDir()),
    ]
    world.host.start_service("baaaht.services.containers", service="container")
    for task_id in missed:
        assert world.finished(task_id).state is TaskState.SUCCEEDED
    assert world.workers(session) == [worker]  # not doubled
    assert len(world.workers(fresh)) == 1
    # Taken up again: its death is noticed and it is replaced, with no call waiting.
    world.docker.containers.get(worker).kill(signal="SIGKILL")
    replacement = wait_for(
        lambda: (found := world.workers(session)) and found[0] != worker and found[0],
        90,
        interval=0.5,
        what="the adopted worker's replacement",
    )
    assert world.workers(session) == [replacement]
