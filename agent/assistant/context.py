"""What the model is shown: the session's conversation as turns, cut to a context budget.

Pure functions over stored messages (schemas/sessions.py Message). A turn is a user message and the
messages answering it (metadata.reply_to names it); a message that answers nothing (a host's system
note, an older agent's reply) belongs to the turn it follows. The budget drops the oldest whole
turns, never part of a message, and says how many were left out; the turn being answered is always
kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from baaaht.schemas.sessions import Message, MessageMetadata

STOP_COMMAND = "/stop"  # a user message that cancels the turn running, never one the model answers
CHARS_PER_TOKEN = 4  # the estimate of a message's tokens: its characters / 4 (no tokenizer in here)
MESSAGE_OVERHEAD = 8  # tokens of a message's framing (role, separators) in either API


@dataclass
class Turn:
    user: Message | None  # None: messages before the conversation's first user message
    messages: list[Message] = field(default_factory=list)  # what followed it, oldest first

    @property
    def ended(self) -> bool:
        """Whether the assistant finished this turn (answered, failed, cancelled or cut by a cap)."""
        return any(m.metadata.turn_end for m in self.messages if m.metadata.reply_to == self._user_id)

    @property
    def _user_id(self) -> str:
        return self.user.id if self.user is not None else ""

    @property
    def own(self) -> list[Message]:
        """The assistant's messages of this turn (its answers and the tools' answers)."""
        return [m for m in self.messages if m.metadata.reply_to and m.metadata.reply_to == self._user_id]


def is_stop(message: Message) -> bool:
    return message.role == "user" and message.content.strip() == STOP_COMMAND


def turns_of(messages: list[Message]) -> list[Turn]:
    """The conversation as turns, each user message (but `/stop`) opening one, in message order."""
    turns: list[Turn] = []
    by_user: dict[str, Turn] = {}
    for message in sorted(messages, key=lambda m: m.seq):
        if is_stop(message):
            continue
        if message.role == "user":
            turn = Turn(message)
            turns.append(turn)
            by_user[message.id] = turn
        elif message.metadata.reply_to in by_user:
            by_user[message.metadata.reply_to].messages.append(message)
        elif turns:
            turns[-1].messages.append(message)
        else:
            turns.append(Turn(None, [message]))
    return turns


def unanswered(messages: list[Message]) -> list[Message]:
    """User messages whose turn the assistant has not ended, oldest first (`/stop` is never one)."""
    return [t.user for t in turns_of(messages) if t.user is not None and not t.ended]


def cost(message: Message) -> int:
    """A message's estimated tokens: its text, its tool calls' names and arguments, its framing."""
    chars = len(message.content) + sum(len(c.name) + len(c.arguments) for c in message.metadata.tool_calls)
    return MESSAGE_OVERHEAD + -(-chars // CHARS_PER_TOKEN)


@dataclass(frozen=True)
class Context:
    turns: list[Turn]
    dropped_turns: int = 0  # the oldest turns left out for the budget
    dropped_messages: int = 0


def fit(turns: list[Turn], budget: int) -> Context:
    """The newest turns whose messages fit `budget` estimated tokens; the last turn always, whole."""
    if not turns:
        return Context([])
    costs = [sum(cost(m) for m in _shown(turn)) for turn in turns]
    total, first = costs[-1], len(turns) - 1
    while first > 0 and total + costs[first - 1] <= budget:
        first -= 1
        total += costs[first]
    dropped = turns[:first]
    return Context(turns[first:], len(dropped), sum(len(_shown(t)) for t in dropped))


def _shown(turn: Turn) -> list[Message]:
    return [turn.user, *turn.messages] if turn.user is not None else list(turn.messages)


def shown_messages(context: Context) -> list[Message]:
    """The messages of the context, in order, without the assistant's own notices (error and
    cancellation texts are for the user, not things the model said)."""
    return [
        m
        for turn in context.turns
        for m in _shown(turn)
        if not (m.role == "assistant" and m.metadata.is_error)
    ]


def dropped_note(context: Context) -> str:
    """What the system prompt says about left-out turns, or ''."""
    if not context.dropped_turns:
        return ""
    return (
        f"The {context.dropped_turns} oldest turns of this conversation ({context.dropped_messages} messages)"
        " are not shown: they did not fit the context budget."
    )


NO_RESULT = "no result: the turn ended before this tool call was answered"


def every_call_answered(messages: list[Message]) -> list[Message]:
    """`messages` with an error answer added after each tool call that has none (a turn that failed or
    was cut between asking and answering): both APIs refuse a tool call left unanswered."""
    found: list[Message] = []
    waiting: dict[str, Message] = {}  # call id -> the assistant message that asked

    def close_open() -> None:
        for call_id, asker in waiting.items():
            name = next(c.name for c in asker.metadata.tool_calls if c.id == call_id)
            metadata = MessageMetadata(
                tool_call_id=call_id, tool_name=name, reply_to=asker.metadata.reply_to, is_error=True
            )
            found.append(
                Message(
                    id="", seq=asker.seq, time=asker.time, role="tool", content=NO_RESULT, metadata=metadata
                )
            )
        waiting.clear()

    for message in messages:
        if message.role == "tool":
            waiting.pop(message.metadata.tool_call_id, None)
        else:
            close_open()
        found.append(message)
        if message.role == "assistant":
            waiting = {c.id: message for c in message.metadata.tool_calls}
    close_open()
    return found


EMPTY_MESSAGE = "(an empty message)"  # the Messages API refuses an empty text block


def user_text(message: Message) -> str:
    """A user's message as the model reads it; a host's (system) note marked as such."""
    content = message.content or EMPTY_MESSAGE
    return content if message.role == "user" else f"[{message.role} message] {content}"
