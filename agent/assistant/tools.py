"""Tool calls as scheduler tasks of the session's worker (DESIGN: tool calls on the scheduler).

A call is submitted on the `tools` queue with the idempotency key `<turn id>:<call id>`, so the same
call submitted again (a turn taken up after a restart) is the same task; then waited for with
`task.wait`, whose partials are the tool's streamed output. The answer is the task's result as JSON,
or its error, or its cancellation: always one."""

from __future__ import annotations

import json

import msgspec

from baaaht.agent.assistant.turns import Bus, Partials, ToolAnswer
from baaaht.bus.errors import BusError
from baaaht.schemas.sessions import MessageToolCall
from baaaht.schemas.tasks import (
    RetryPolicy,
    TaskCancel,
    TaskFinished,
    TaskProgressReport,
    TaskState,
    TaskSubmit,
    TaskWait,
    Timeouts,
)
from baaaht.schemas.tools import TOOLS_QUEUE, AnyToolCall, ToolExecChunk

SUBMIT_TIMEOUT = 10.0
TURN_CANCELLED = "the assistant's turn was cancelled"
_chunk = msgspec.msgpack.Decoder(ToolExecChunk)
_encode = msgspec.msgpack.Encoder().encode


def tool_call_of(call: MessageToolCall) -> AnyToolCall:
    """The typed call of a model's tool call; ValueError naming what is wrong with its arguments."""
    try:
        arguments = json.loads(call.arguments or "{}")
    except ValueError as error:
        raise ValueError(f"the arguments of {call.name} are not JSON: {error}") from None
    if not isinstance(arguments, dict):
        raise ValueError(f"the arguments of {call.name} must be a JSON object")
    try:
        return msgspec.convert({**arguments, "tool": call.name}, AnyToolCall)
    except msgspec.ValidationError as error:
        raise ValueError(f"bad arguments for {call.name}: {error}") from None


def answer_of(task: TaskFinished) -> ToolAnswer:
    """The tool's answer from its finished task."""
    if task.state is TaskState.SUCCEEDED:
        return ToolAnswer(
            msgspec.json.encode(msgspec.msgpack.decode(task.result)).decode() if task.result else "{}"
        )
    if task.state is TaskState.CANCELLED:
        return ToolAnswer(f"cancelled: {task.error or 'the tool call was cancelled'}", True)
    kind = task.error_type or task.state.value
    return ToolAnswer(f"{kind}: {task.error or 'the tool call failed'}", True)


class SchedulerTools:
    def __init__(self, bus: Bus, session_id: str, timeout: float):
        self.bus, self.session_id, self.timeout = bus, session_id, timeout
        # idempotency key -> task id, while waited for (and after a cancel cut the wait, for cancel())
        self._tasks: dict[str, str] = {}

    async def run(self, turn_id: str, call: MessageToolCall, output: Partials) -> ToolAnswer:
        try:
            typed = tool_call_of(call)
        except ValueError as error:
            return ToolAnswer(str(error), True)
        key = f"{turn_id}:{call.id}"
        submit = TaskSubmit(
            queue=TOOLS_QUEUE,
            task_type=call.name,
            payload=_encode(typed),
            session_id=self.session_id,
            key=key,
            timeouts=Timeouts(schedule_to_start=self.timeout),
            retry=RetryPolicy(maximum_attempts=1),  # a tool is not run twice behind the model's back
        )
        try:
            submitted = await self.bus.call(submit, timeout=SUBMIT_TIMEOUT)
            self._tasks[key] = submitted.task.id
            async for part in self.bus.stream(TaskWait(id=submitted.task.id), timeout=self.timeout):
                if isinstance(part, TaskProgressReport):
                    await output.publish("tool_result", _chunk_text(part.data), call.id)
                elif isinstance(part, TaskFinished):
                    self._tasks.pop(key, None)
                    return answer_of(part)
        except BusError as error:
            # A wait given up on (its deadline passed): the task is not left running.
            await self.cancel(turn_id, call, f"the assistant stopped waiting for it: {error.message}")
            return ToolAnswer(f"the tool call could not be run: {error}", True)
        return ToolAnswer("the tool call's wait ended without its result", True)

    async def cancel(self, turn_id: str, call: MessageToolCall, reason: str = TURN_CANCELLED) -> None:
        task_id = self._tasks.pop(f"{turn_id}:{call.id}", None)
        if task_id:
            try:
                await self.bus.call(TaskCancel(id=task_id, reason=reason))
            except BusError:
                pass  # finished meanwhile, or the scheduler away: the answer is `cancelled` either way


def _chunk_text(data: bytes) -> str:
    try:
        return _chunk.decode(data).data
    except msgspec.DecodeError:
        return ""
