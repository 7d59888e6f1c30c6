"""Tool calls as scheduler tasks (pure, against a fake bus): what is submitted, how the wait's output
and end become the call's answer, and the cancel of a call cut short."""

from __future__ import annotations

import asyncio

import msgspec

from baaaht.agent.assistant.tools import SchedulerTools
from baaaht.agent.assistant.turns import Partials, ToolAnswer
from baaaht.bus.errors import BusError
from baaaht.bus.testing import run_async
from baaaht.schemas.errors import ErrorCode
from baaaht.schemas.sessions import MessageToolCall
from baaaht.schemas.tasks import (
    TaskCancel,
    TaskFinished,
    TaskInfo,
    TaskProgressReport,
    TaskState,
    TaskSubmit,
    TaskSubmitResult,
    TaskWait,
)
from baaaht.schemas.tools import CALL_DECODER, ToolExecChunk, ToolReadFile, ToolReadFileResult

S = "s" * 32
READ = MessageToolCall(id="c1", name="read_file", arguments='{"path": "notes.txt"}')
TASK = "t" * 32


def finished(state: TaskState, **fields) -> TaskFinished:
    return TaskFinished(
        id=TASK, queue="tools", task_type="read_file", state=state, created_at=0.0, updated_at=0.0, **fields
    )


class Bus:
    def __init__(self, *waited, hold: asyncio.Event | None = None, wait_error: BusError | None = None):
        self.waited, self.hold, self.wait_error = list(waited), hold, wait_error
        self.calls: list = []
        self.partials: list = []

    async def call(self, request, timeout=None):
        self.calls.append(request)
        if isinstance(request, TaskSubmit):
            task = TaskInfo(
                id=TASK,
                queue=request.queue,
                task_type=request.task_type,
                state=TaskState.QUEUED,
                created_at=0.0,
                updated_at=0.0,
            )
            return TaskSubmitResult(task=task)
        assert isinstance(request, TaskCancel)
        return finished(TaskState.CANCELLED)

    async def stream(self, request, timeout=None):
        self.calls.append(request)
        for part in self.waited:
            yield part
        if self.wait_error is not None:
            raise self.wait_error
        if self.hold is not None:
            await self.hold.wait()

    async def publish(self, event):
        self.partials.append(event)


def run(bus: Bus, call: MessageToolCall = READ) -> ToolAnswer:
    tools = SchedulerTools(bus, S, timeout=60.0)
    return run_async(tools.run("turn1", call, Partials(bus, S, "turn1")), timeout=10)


def test_a_call_is_submitted_on_the_tools_queue_keyed_by_turn_and_call_and_its_result_is_the_answer():
    result = ToolReadFileResult(path="notes.txt", content="first line\n", start_line=1, end_line=1, size=11)
    chunk = ToolExecChunk(stream="stdout", data="partial output")
    progress = TaskProgressReport(task_id=TASK, attempt=1, seq=1, data=msgspec.msgpack.encode(chunk))
    bus = Bus(progress, finished(TaskState.SUCCEEDED, result=msgspec.msgpack.encode(result)))
    answer = run(bus)
    submit, wait = bus.calls
    assert (submit.queue, submit.task_type, submit.session_id, submit.key) == (
        "tools",
        "read_file",
        S,
        "turn1:c1",
    )
    assert CALL_DECODER.decode(submit.payload) == ToolReadFile(path="notes.txt")
    assert submit.retry.maximum_attempts == 1 and wait == TaskWait(id=TASK)
    assert not answer.is_error
    assert msgspec.json.decode(answer.content) == msgspec.to_builtins(result)
    assert [(p.kind, p.text, p.tool_call_id) for p in bus.partials] == [
        ("tool_result", "partial output", "c1")
    ]


def test_a_failed_or_cancelled_task_is_an_error_answer_naming_why():
    failed = run(Bus(finished(TaskState.FAILED, error_type="not_found", error="no such file: notes.txt")))
    assert failed == ToolAnswer("not_found: no such file: notes.txt", True)
    cancelled = run(Bus(finished(TaskState.CANCELLED, error="by the operator")))
    assert cancelled == ToolAnswer("cancelled: by the operator", True)
    dead = run(Bus(finished(TaskState.DEAD)))
    assert dead.is_error and dead.content.startswith("dead:")


def test_bad_arguments_are_answered_without_submitting_anything():
    for arguments, says in [
        ("not json", "not JSON"),
        ("[1]", "must be a JSON object"),
        ('{"path": ""}', "bad arguments for read_file"),
    ]:
        bus = Bus()
        answer = run(bus, MessageToolCall(id="c1", name="read_file", arguments=arguments))
        assert answer.is_error and says in answer.content and bus.calls == []
    bus = Bus()
    assert run(bus, MessageToolCall(id="c9", name="format_disk", arguments="{}")).is_error and bus.calls == []


def test_a_call_cut_short_is_cancelled_by_its_task_id():
    bus = Bus(hold=asyncio.Event())
    tools = SchedulerTools(bus, S, timeout=60.0)

    async def scenario():
        running = asyncio.create_task(tools.run("turn1", READ, Partials(bus, S, "turn1")))
        while len(bus.calls) < 2:  # submitted and waiting
            await asyncio.sleep(0.01)
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await tools.cancel("turn1", READ)
        await tools.cancel("turn1", READ)  # once only

    run_async(scenario(), timeout=10)
    (cancel,) = [c for c in bus.calls if isinstance(c, TaskCancel)]
    assert cancel == TaskCancel(id=TASK, reason="the assistant's turn was cancelled")  # once only


def test_a_wait_past_its_deadline_cancels_the_task_and_says_so():
    bus = Bus(wait_error=BusError(ErrorCode.TIMEOUT, "the call's deadline passed"))
    answer = run(bus)
    assert answer.is_error and "could not be run" in answer.content and "deadline" in answer.content
    (cancel,) = [c for c in bus.calls if isinstance(c, TaskCancel)]
    assert cancel.id == TASK and cancel.reason.startswith("the assistant stopped waiting for it")
