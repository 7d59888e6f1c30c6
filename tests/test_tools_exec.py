"""The exec tool with real processes: argv, cwd by descriptor, environment, stdin, output caps, the
soft and hard timeouts, and cancellation killing the whole process group."""

from __future__ import annotations

import asyncio
import os
import select
import signal
import sys

import pytest

from baaaht.agent.tools.errors import ToolError
from baaaht.agent.tools.exec import _Stream, run_exec
from baaaht.agent.tools.workspace import Workspace
from baaaht.schemas.errors import ErrorCode
from baaaht.schemas.tools import ToolExec, ToolExecChunk


@pytest.fixture
def ws(tmp_path):
    root = tmp_path / "workspace"
    (root / "sub").mkdir(parents=True)
    workspace = Workspace(str(root))
    yield workspace
    workspace.close()


def run(ws, **fields):
    chunks: list[ToolExecChunk] = []
    result = asyncio.run(asyncio.wait_for(run_exec(ws, ToolExec(**fields), chunks.append), 60))
    return result, chunks


def text(chunks, stream):
    return "".join(chunk.data for chunk in chunks if chunk.stream == stream)


def test_argv_runs_in_the_cwd_with_stdin_and_the_exit_code(ws):
    result, chunks = run(
        ws,
        argv=[
            sys.executable,
            "-c",
            "import os,sys; print(os.getcwd()); print(sys.stdin.read()[::-1]); sys.exit(3)",
        ],
        cwd="sub",
        stdin="olleh",
    )
    assert result.exit_code == 3 and not result.timed_out
    assert text(chunks, "stdout") == f"{ws.root}/sub\nhello\n"


def test_arguments_are_never_interpolated_into_a_shell(ws):
    _, chunks = run(ws, argv=["echo", "$(id)", "; rm -rf /", "`x`"])
    assert text(chunks, "stdout") == "$(id) ; rm -rf / `x`\n"


def test_the_environment_is_the_allowlist_and_the_calls_own(ws, monkeypatch):
    monkeypatch.setenv("BAAAHT_BUS_SECRET", "worker-only")
    _, chunks = run(ws, argv=["env"], env={"MY_VAR": "1"})
    names = {line.split("=", 1)[0] for line in text(chunks, "stdout").splitlines()}
    assert "MY_VAR" in names and "PATH" in names and "BAAAHT_BUS_SECRET" not in names


def test_stderr_is_its_own_stream(ws):
    result, chunks = run(ws, argv=["sh", "-c", "echo out; echo err >&2"])
    assert (text(chunks, "stdout"), text(chunks, "stderr"), result.exit_code) == ("out\n", "err\n", 0)


def test_output_far_over_the_cap_is_cut_with_a_marker_and_the_caller_survives(ws):
    result, chunks = run(ws, argv=["sh", "-c", "head -c 50000000 /dev/zero | tr '\\0' x"], max_output=1000)
    out = [chunk for chunk in chunks if chunk.stream == "stdout"]
    assert out[-1].truncated and "truncated after 1000 bytes" in out[-1].data
    assert sum(len(chunk.data) for chunk in out[:-1]) == 1000
    assert result.stdout_truncated and result.stdout_bytes == 50_000_000 and result.exit_code == 0


def test_a_command_ignoring_sigterm_is_killed_at_the_hard_timeout(ws):
    script = (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('up', flush=True)\n"
        "time.sleep(60)\n"
    )
    result, chunks = run(ws, argv=[sys.executable, "-c", script], timeout=0.5, kill_after=0.5)
    assert result.timed_out and result.exit_code == -signal.SIGKILL and text(chunks, "stdout") == "up\n"
    assert result.duration < 30


def test_the_soft_timeout_sends_sigterm(ws):
    result, _ = run(ws, argv=["sleep", "60"], timeout=0.3)
    assert result.timed_out and result.exit_code == -signal.SIGTERM


def alive(pid: int) -> int | None:
    """A pidfd of a live process (readable once it exits), or None if it is gone."""
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None


def gone_within(pid: int, seconds: float) -> bool:
    fd = alive(pid)
    if fd is None:
        return True
    try:
        return bool(select.select([fd], [], [], seconds)[0])
    finally:
        os.close(fd)


def test_cancel_kills_the_whole_group_grandchild_included(ws):
    async def scenario():
        pids: list[int] = []
        seen = asyncio.Event()

        def emit(chunk):
            pids.extend(int(word) for word in chunk.data.split())
            if len(pids) == 1:
                seen.set()

        # the shell starts a grandchild (sleep) and prints its pid
        call = ToolExec(argv=["sh", "-c", "sleep 60 & echo $!; wait"], timeout=60)
        task = asyncio.create_task(run_exec(ws, call, emit))
        await asyncio.wait_for(seen.wait(), 30)
        assert not gone_within(pids[0], 0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return pids[0]

    assert gone_within(asyncio.run(scenario()), 10)


def test_what_the_program_leaves_running_is_killed_when_it_exits(ws):
    result, chunks = run(ws, argv=["sh", "-c", "sleep 60 & echo $!"])
    grandchild = int(text(chunks, "stdout"))
    assert result.exit_code == 0 and result.duration < 30
    assert gone_within(grandchild, 10)


def test_errors_name_the_program_and_the_cwd(ws):
    with pytest.raises(ToolError) as caught:
        run(ws, argv=["no-such-program-here"])
    assert caught.value.code == ErrorCode.NOT_FOUND and "no-such-program-here" in caught.value.message
    with pytest.raises(ToolError) as caught:
        run(ws, argv=["true"], cwd="../")
    assert caught.value.code == ErrorCode.PERMISSION_DENIED
    with pytest.raises(ToolError) as caught:
        run(ws, argv=["true"], cwd="missing")
    assert caught.value.code == ErrorCode.NOT_FOUND


def test_output_that_fills_the_limit_exactly_in_one_read_is_marked_truncated_by_the_next():
    chunks: list[ToolExecChunk] = []
    stream = _Stream("stdout", 4, chunks.append)
    stream.take(b"abcd")  # exactly the limit: nothing cut yet
    assert not stream.truncated
    stream.take(b"ef")
    stream.take(b"gh")
    stream.finish()
    assert [c.data for c in chunks] == ["abcd", "\n[stdout truncated after 4 bytes]\n"]
    assert stream.truncated and stream.seen == 8 and chunks[-1].truncated
