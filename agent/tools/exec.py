"""The exec tool: a program from an argv list (never a shell baaaht writes) in its own process group.

Output is handed to `emit` as it comes, each stream cut after max_output bytes with one marker chunk
(the rest is read and dropped, so the program never blocks on a full pipe). At the soft timeout the
whole group gets SIGTERM, kill_after later SIGKILL; when the program exits, or the call is
cancelled, whatever is left of its group is killed.
"""

from __future__ import annotations

import asyncio
import codecs
import os
import signal
import time
from collections.abc import Callable

from baaaht.agent.tools.errors import ToolError
from baaaht.agent.tools.workspace import Workspace
from baaaht.schemas.errors import ErrorCode
from baaaht.schemas.tools import ToolExec, ToolExecChunk, ToolExecResult

# The only variables of the worker's own environment a program sees; the rest (the bus settings
# among them) stays out. The call's `env` comes on top.
INHERITED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TERM", "TMPDIR")
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
READ_SIZE = 64 * 1024
DRAIN_AFTER_EXIT = 2.0  # seconds to read what is left in the pipes once the group is gone


def environment(call: ToolExec) -> dict[str, str]:
    env = {name: os.environ[name] for name in INHERITED_ENV if name in os.environ}
    env.setdefault("PATH", DEFAULT_PATH)
    env.update(call.env)
    return env


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # the group is gone already


class _Stream:
    def __init__(self, name: str, limit: int, emit: Callable[[ToolExecChunk], None]) -> None:
        self.name = name
        self.limit = limit
        self.emit = emit
        self.seen = 0
        self.truncated = False
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def take(self, data: bytes) -> None:
        room = self.limit - self.seen
        self.seen += len(data)
        if self.truncated:
            return
        kept = data[: max(0, room)]  # nothing when the last read ended right at the limit
        cut = len(kept) < len(data)
        text = self.decoder.decode(kept, final=cut)
        if text:
            self.emit(ToolExecChunk(stream=self.name, data=text))
        if cut:
            self.truncated = True
            self.emit(
                ToolExecChunk(
                    stream=self.name,
                    data=f"\n[{self.name} truncated after {self.limit} bytes]\n",
                    truncated=True,
                )
            )

    def finish(self) -> None:
        if not self.truncated and (text := self.decoder.decode(b"", final=True)):
            self.emit(ToolExecChunk(stream=self.name, data=text))

    async def pump(self, reader: asyncio.StreamReader) -> None:
        while data := await reader.read(READ_SIZE):
            self.take(data)
        self.finish()


async def run_exec(
    workspace: Workspace, call: ToolExec, emit: Callable[[ToolExecChunk], None]
) -> ToolExecResult:
    cwd_fd = workspace.open_dir(call.cwd)
    started = time.monotonic()
    try:
        # the child enters its cwd by our descriptor, so nothing is resolved again by name
        process = await asyncio.create_subprocess_exec(
            *call.argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=f"/proc/self/fd/{cwd_fd}",
            pass_fds=(cwd_fd,),
            env=environment(call),
            start_new_session=True,
            close_fds=True,
        )
    except FileNotFoundError:
        raise ToolError(
            ErrorCode.NOT_FOUND, f"program {call.argv[0]!r} was not found", argv0=call.argv[0]
        ) from None
    except PermissionError:
        raise ToolError(
            ErrorCode.PERMISSION_DENIED, f"program {call.argv[0]!r} is not executable", argv0=call.argv[0]
        ) from None
    finally:
        os.close(cwd_fd)
    pgid = process.pid  # start_new_session: the leader's pid is the group's id
    out = _Stream("stdout", call.max_output, emit)
    err = _Stream("stderr", call.max_output, emit)
    pumps = [asyncio.create_task(out.pump(process.stdout)), asyncio.create_task(err.pump(process.stderr))]
    feeder = asyncio.create_task(_feed(process.stdin, call.stdin.encode()))
    timed_out = False
    exited = _exit_of(process.pid)
    try:
        try:
            await asyncio.wait_for(asyncio.shield(exited), call.timeout)
        except TimeoutError:
            timed_out = True
            _kill_group(pgid, signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(exited), call.kill_after)
            except TimeoutError:
                _kill_group(pgid, signal.SIGKILL)
        _kill_group(pgid, signal.SIGKILL)  # what the program left running in its group
        await asyncio.wait(pumps, timeout=DRAIN_AFTER_EXIT)
        await process.wait()
    finally:
        exited.cancel()
        _kill_group(pgid, signal.SIGKILL)
        for task in (*pumps, feeder):
            task.cancel()
        if process.returncode is None:
            await asyncio.shield(process.wait())
    return ToolExecResult(
        exit_code=process.returncode,
        timed_out=timed_out,
        stdout_bytes=out.seen,
        stderr_bytes=err.seen,
        stdout_truncated=out.truncated,
        stderr_truncated=err.truncated,
        duration=round(time.monotonic() - started, 6),
    )


def _exit_of(pid: int) -> asyncio.Future[None]:
    """Done when the process exits. Its pipes may stay open in programs it left behind, and
    asyncio's wait() waits for those too; a pidfd says when the program itself is done."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:  # exited and reaped already
        done.set_result(None)
        return done

    def readable() -> None:
        if not done.done():
            done.set_result(None)

    def release(_: asyncio.Future[None]) -> None:
        loop.remove_reader(fd)
        os.close(fd)

    loop.add_reader(fd, readable)
    done.add_done_callback(release)
    return done


async def _feed(stdin: asyncio.StreamWriter, data: bytes) -> None:
    try:
        if data:
            stdin.write(data)
            await stdin.drain()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the program did not read all of it
    finally:
        stdin.close()
