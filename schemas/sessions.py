"""Session manager messages (`session.*`): sessions, their conversations and their events.

Times are seconds since the epoch (wall clock, so that idle and expiry clocks continue across
restarts); durations are seconds. Paged results carry `next_cursor`: pass it back as `cursor` for
the next page; 0 means there is none.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, ClassVar, Literal

import msgspec

from baaaht.schemas.base import Empty, Event, Request, Response
from baaaht.schemas.ids import ContainerId, SessionId


class SessionState(str, enum.Enum):
    """initializing -> active <-> idle -> closing -> closed (terminal); see services/sessions/states.py."""

    INITIALIZING = "initializing"
    ACTIVE = "active"
    IDLE = "idle"
    CLOSING = "closing"
    CLOSED = "closed"


Role = Literal["user", "assistant", "system", "tool"]
ROLES: tuple[str, ...] = Role.__args__
MessageOrder = Literal["oldest", "newest"]
MAX_PAGE = 1000
PageLimit = Annotated[int, msgspec.Meta(ge=1, le=MAX_PAGE, description="Items per page.")]
Cursor = Annotated[int, msgspec.Meta(ge=0, description="0, or a next_cursor from an earlier page.")]


class SessionSettings(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Per-session limits, fixed at creation. 0 means the host default."""

    max_containers: int = 0  # 0: the host's policy.max_containers; never more than it
    max_duration: float = 0.0  # after this long the session is closed; 0: no limit
    idle_timeout: float = 0.0  # 0: the host's session.timeout
    allowed_images: list[str] = []  # empty: whatever the host policy allows
    # Judged by the policy engine, which may only let it tighten the host policy.
    policy_override: dict[str, Any] = {}


class SessionContainer(msgspec.Struct, kw_only=True, omit_defaults=True):
    id: str
    attached_at: float
    exited: bool = False  # set by `container.died`; the entry goes away on `container.removed`


class SessionInfo(Response, kw_only=True):
    id: str
    state: SessionState
    owner: str  # on whose behalf it exists: its creator, or whom a host creator named
    created_by: str = ""  # who created it, as the broker saw the caller (`operator/uid=1000`, ...)
    name: str = ""
    description: str = ""
    labels: dict[str, str] = {}
    tags: list[str] = []
    settings: SessionSettings = msgspec.field(default_factory=SessionSettings)
    created_at: float
    updated_at: float
    last_activity_at: float  # the last message; idleness is measured from here
    expires_at: float = 0.0  # 0: never
    closed_at: float = 0.0
    close_reason: str = ""
    containers: list[SessionContainer] = []
    current_task_id: str = ""
    task_history: list[str] = []  # earlier current_task_id values, oldest first
    message_count: int = 0


class MessageToolCall(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A tool call the model asked for, as stored with the assistant message that asked for it."""

    id: str  # the model's id of the call; the tool's answer names it in tool_call_id
    name: str  # a tool of schemas/tools.py
    arguments: str = "{}"  # the JSON object the model gave as the tool's input


# How an assistant turn ended, on the turn's last message: answered, stopped by a cancel, failed (a
# provider error, no route or credential), or cut by the assistant's caps on turns and tool calls.
TurnEnd = Literal["", "done", "cancelled", "failed", "limit"]


class MessageMetadata(msgspec.Struct, kw_only=True, omit_defaults=True):
    tool_name: str = ""
    tool_call_id: str = ""
    container_id: str = ""
    extra: dict[str, str] = {}
    # An assistant's messages (agent/assistant/): the turn they belong to, the user message it answers,
    # the tool calls the model asked for in this message, whether a tool's answer is an error, and
    # on the turn's last message how it ended.
    turn_id: str = ""
    reply_to: str = ""
    tool_calls: list[MessageToolCall] = []
    is_error: bool = False
    turn_end: TurnEnd = ""


class Message(Response, kw_only=True):
    id: str
    seq: int  # 1, 2, 3... in the one order every reader sees
    time: float
    role: Role
    content: str
    metadata: MessageMetadata = msgspec.field(default_factory=MessageMetadata)
    sender: str = ""  # who sent it, as the broker saw the caller (never as the caller claims)


class SessionPage(Response, kw_only=True):
    sessions: list[SessionInfo]
    next_cursor: int = 0


class MessagePage(Response, kw_only=True):
    messages: list[Message]
    next_cursor: int = 0


class SessionCreate(Request, tag="session.create", kw_only=True):
    response: ClassVar[type] = SessionInfo

    # Empty: the caller owns it. The operator and host services may name another owner on whose
    # behalf they create it (the session records both).
    owner: str = ""
    name: str = ""
    description: str = ""
    labels: dict[str, str] = {}
    tags: list[str] = []
    settings: SessionSettings = msgspec.field(default_factory=SessionSettings)


class SessionGet(Request, tag="session.get", kw_only=True):
    response: ClassVar[type] = SessionInfo

    session_id: SessionId


class SessionList(Request, tag="session.list", kw_only=True):
    """Sessions oldest first, matching every filter given (labels: all must match)."""

    response: ClassVar[type] = SessionPage

    states: list[SessionState] = []
    owner: str = ""
    labels: dict[str, str] = {}
    limit: PageLimit = 100
    cursor: Cursor = 0


class SessionUpdate(Request, tag="session.update", kw_only=True):
    """Change metadata and context; fields left out (None) stay as they are. A new
    current_task_id moves the previous one to task_history."""

    response: ClassVar[type] = SessionInfo

    session_id: SessionId
    name: str | None = None
    description: str | None = None
    labels: dict[str, str] | None = None
    tags: list[str] | None = None
    current_task_id: str | None = None


class SessionClose(Request, tag="session.close", kw_only=True):
    """Idempotent. With `wait`, answers once the session is closed or the call's deadline is near
    (then still `closing`: the removal of its containers goes on)."""

    response: ClassVar[type] = SessionInfo

    session_id: SessionId
    reason: str = ""
    wait: bool = True


class SessionDelete(Request, tag="session.delete", kw_only=True):
    """Forget a closed session and its conversation."""

    response: ClassVar[type] = Empty

    session_id: SessionId


class SessionSendMessage(Request, tag="session.send_message", kw_only=True):
    response: ClassVar[type] = Message

    session_id: SessionId
    role: Role = "user"
    content: str
    metadata: MessageMetadata = msgspec.field(default_factory=MessageMetadata)


class SessionMessages(Request, tag="session.messages", kw_only=True):
    response: ClassVar[type] = MessagePage

    session_id: SessionId
    order: MessageOrder = "oldest"
    limit: PageLimit = 100
    cursor: Cursor = 0


class SessionCancel(Request, tag="session.cancel", kw_only=True):
    """Stop the session's current turn: its assistant stops generating and cancels the tools it runs
    (event `session.cancel/<session id>`). The operator, and the session's own agents, may ask."""

    response: ClassVar[type] = Empty

    session_id: SessionId
    reason: str = ""


class SessionAttachContainer(Request, tag="session.attach_container", kw_only=True):
    response: ClassVar[type] = SessionInfo

    session_id: SessionId
    container_id: ContainerId


class SessionDetachContainer(Request, tag="session.detach_container", kw_only=True):
    response: ClassVar[type] = SessionInfo

    session_id: SessionId
    container_id: ContainerId


class SessionCreated(Event, tag="session.created", kw_only=True):
    session: SessionInfo


class SessionUpdated(Event, tag="session.updated", kw_only=True):
    session: SessionInfo
    change: Literal["state", "metadata", "containers"]
    previous_state: SessionState | None = None


class SessionIdle(Event, tag="session.idle", kw_only=True):
    session_id: str
    owner: str
    last_activity_at: float


class SessionClosed(Event, tag="session.closed", kw_only=True):
    session_id: str
    owner: str
    reason: str
    # Containers the container manager did not confirm as removed within session.close_timeout;
    # its reconcile removes them later.
    remaining_containers: list[str] = []


class SessionDeleted(Event, tag="session.deleted", kw_only=True):
    """The session and its conversation are gone; the container manager removes its volumes."""

    session_id: str
    owner: str


class SessionMessage(Event, tag="session.message", kw_only=True):
    """Published under `session.message/<session id>` (schemas/base.py topic_for), so one
    conversation can be followed."""

    session_id: str
    message: Message


class SessionCancelled(Event, tag="session.cancel", kw_only=True):
    """A `session.cancel` was asked for: the session's assistant stops its current turn."""

    session_id: str
    requested_by: str  # who asked, as the broker saw the caller
    reason: str = ""


PartialKind = Literal["text", "tool_call", "tool_result", "status"]


class SessionPartial(Event, tag="session.partial", kw_only=True):
    """A piece of an assistant's answer as it is generated, published by the assistant itself under
    `session.partial/<session id>`: model text as it streams (`text`), a tool call it asked for
    (`tool_call`: name and arguments), a tool's answer (`tool_result`), a change of state
    (`status`: e.g. retrying, cancelled). `seq` counts from 1 within a turn; the stored message is
    the record, partials are only for watching live."""

    session_id: str
    turn_id: str
    seq: int
    kind: PartialKind
    text: str = ""
    tool_call_id: str = ""  # of a tool_call or tool_result
