"""The worker agent's own logic (agent/worker.py), on the real tool library and a fake task: how a task
becomes a tool call, its result, its failure; the slots setting; retrying task.work while unidentified."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from baaaht.agent.settings import SettingsError
from baaaht.agent.worker import SessionTools, egress_socket_of, serve, slots_setting, tool_handler
from baaaht.bus.errors import BusError
from baaaht.bus.testing import run_async
from baaaht.bus.worker import NonRetryableError, WorkerTask
from baaaht.schemas.errors import ErrorCode
from baaaht.schemas.tools import ToolReadFileResult, ToolWriteFileResult


class Task(WorkerTask):
    """A WorkerTask that keeps what the handler streamed."""

    def __init__(self, tool: str, payload):
        super().__init__(
            id="t1", queue="tools", type=tool, payload=payload, session_id="s", attempt=1, lease_id="l"
        )
        self.sent: list[bytes] = []

    def progress(self, data: bytes) -> None:
        self.sent.append(data)


@pytest.fixture
def handle(tmp_path):
    tools = SessionTools(str(tmp_path / "workspace"), str(tmp_path / "egress.sock"))
    yield tool_handler(tools)
    tools.close()


def test_a_task_is_its_tool_call_and_the_result_is_the_tools(handle, tmp_path):
    (tmp_path / "workspace").mkdir()  # after the worker started: the workspace is opened at the first call
    written = run_async(handle(Task("write_file", {"tool": "write_file", "path": "a.txt", "content": "hi"})))
    assert written == ToolWriteFileResult(path="a.txt", size=2, created=True)
    read = run_async(handle(Task("read_file", {"tool": "read_file", "path": "a.txt"})))
    assert isinstance(read, ToolReadFileResult) and read.content == "hi"
    # the Worker msgpacks the returned struct: the caller decodes a tagged ToolOutput
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(read))["type"] == "read_file.result"


@pytest.mark.parametrize(
    "tool, payload, error_type, says",
    [
        ("list_dir", {"tool": "list_dir", "path": "missing"}, "NOT_FOUND", "does not exist"),
        ("read_file", {"tool": "read_file", "path": "../etc/passwd"}, "PERMISSION_DENIED", "`..`"),
        ("read_file", {"tool": "read_file"}, "INVALID_ARGUMENT", "missing required field `path`"),
        ("read_file", {"tool": "no_such_tool"}, "INVALID_ARGUMENT", "not a tool call"),
        ("read_file", None, "INVALID_ARGUMENT", "not a tool call"),
        ("list_dir", {"tool": "read_file", "path": "a"}, "INVALID_ARGUMENT", "is not its call's tool"),
    ],
)
def test_a_failed_call_fails_its_task_without_retry_naming_the_error_code(
    handle, tmp_path, tool, payload, error_type, says
):
    (tmp_path / "workspace").mkdir()
    with pytest.raises(NonRetryableError) as failed:
        run_async(handle(Task(tool, payload)))
    assert failed.value.error_type == error_type and says in str(failed.value)


def test_slots_come_from_the_flag_else_the_environment_else_four():
    assert slots_setting(None, {}) == 4
    assert slots_setting(None, {"BAAAHT_WORKER_SLOTS": "8"}) == 8
    assert slots_setting(2, {"BAAAHT_WORKER_SLOTS": "8"}) == 2
    for flag, environ, named in [
        (0, {}, "--slots"),
        (None, {"BAAAHT_WORKER_SLOTS": "many"}, "BAAAHT_WORKER_SLOTS"),
    ]:
        with pytest.raises(SettingsError, match=named):
            slots_setting(flag, environ)


def test_the_egress_socket_is_beside_the_bus_socket():
    assert egress_socket_of("ipc:///run/baaaht/agent/bus.sock") == "/run/baaaht/agent/egress.sock"
    with pytest.raises(SettingsError, match="ipc://"):
        egress_socket_of("tcp://127.0.0.1:5555")


class RefusedWorker:
    """Refused task.work `refusals` times, then stops (cancelled) at its next run."""

    def __init__(self, refusals: int, code: ErrorCode = ErrorCode.PERMISSION_DENIED):
        self.refusals = refusals
        self.code = code
        self.runs: list[float] = []

    async def run(self) -> None:
        self.runs.append(asyncio.get_running_loop().time())
        if len(self.runs) <= self.refusals:
            raise BusError(self.code, "unidentified callers may not call task.work")
        raise asyncio.CancelledError


def test_while_unidentified_task_work_is_asked_again_every_second_and_at_once_when_told():
    async def scenario():
        worker, retry_now = RefusedWorker(refusals=2), asyncio.Event()
        running = asyncio.create_task(serve(worker, retry_now))
        while len(worker.runs) < 2:
            await asyncio.sleep(0.01)  # the second run came after the 1 s pause
        retry_now.set()  # SIGURG: the third comes at once
        with pytest.raises(asyncio.CancelledError):
            await running
        return worker.runs

    first, second, third = run_async(scenario(), timeout=10)
    assert 0.9 <= second - first <= 2.0
    assert third - second < 0.5


def test_another_refusal_ends_the_worker():
    with pytest.raises(BusError) as refused:
        run_async(serve(RefusedWorker(1, ErrorCode.INVALID_ARGUMENT), asyncio.Event()), timeout=5)
    assert refused.value.code is ErrorCode.INVALID_ARGUMENT
