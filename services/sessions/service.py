"""The session manager: sessions, their conversations, idleness, expiry and session-scoped cleanup.

Every change is one store write (a function the store's committer thread runs), answered only
after its commit; its events are published right after the commit, in commit order. Clocks are
wall-clock times kept in the store, so idle and expiry clocks continue across restarts, and a
session caught in `closing` by a crash finishes closing after the restart.
"""

from __future__ import annotations

import functools
import logging
import secrets
import threading
import time
from typing import Callable

import msgspec

from baaaht.bus.background import background
from baaaht.bus.callers import (
    AGENT_ROLES,
    ASSISTANT,
    denied,
    is_host,
    name_of,
    require_host,
    require_session,
    role_of,
)
from baaaht.bus.client import BusClient
from baaaht.bus.errors import BusError, exhausted, invalid, not_found, precondition
from baaaht.bus.peers import Peer
from baaaht.bus.service import CallContext, Deferred, Publisher, Service, on_event, rpc
from baaaht.common.session_quotas import SessionQuotas
from baaaht.schemas.base import Empty, Event
from baaaht.schemas.config import Config
from baaaht.schemas.containers import ContainerDied, ContainerRemoved
from baaaht.schemas.errors import ErrorCode
from baaaht.schemas.ids import MAX_ID
from baaaht.schemas.sessions import (
    Message,
    MessagePage,
    SessionAttachContainer,
    SessionCancel,
    SessionCancelled,
    SessionClose,
    SessionClosed,
    SessionContainer,
    SessionCreate,
    SessionCreated,
    SessionDelete,
    SessionDeleted,
    SessionDetachContainer,
    SessionGet,
    SessionIdle,
    SessionInfo,
    SessionList,
    SessionMessage,
    SessionMessages,
    SessionPage,
    SessionSendMessage,
    SessionState,
    SessionUpdate,
    SessionUpdated,
)
from baaaht.services.sessions import states, validation
from baaaht.services.sessions.reaper import ContainerReaper
from baaaht.services.sessions.states import ACTIVE, CLOSED, CLOSING, IDLE, INITIALIZING, LIVE
from baaaht.services.sessions.store import SessionStore, Transaction

log = logging.getLogger("baaaht.session")

EXPIRED = "expired: max_duration reached"
CLOSED_ON_REQUEST = "closed on request"
STOP_TIMEOUT = 5.0  # seconds on_stop gives closings in progress to finish
CLOSE_SLACK = 5.0  # seconds a waiting close allows beyond session.close_timeout (final listing, commit)
ANSWER_MARGIN = 0.5  # seconds before the caller's deadline when a waiting close answers anyway

# Conversation roles that speak for the human and the host: an agent never writes them.
HOST_MESSAGE_ROLES = ("user", "system")
# The assistant protocol's metadata (agent/assistant/turns.py): which turn a message belongs to, the user
# message it answers, the tool calls asked for, how the turn ended. `send --wait` prints the answer and
# resume_assistants decides what is answered from these, so only the session's assistant writes them.
TURN_FIELDS = ("turn_id", "reply_to", "tool_calls", "turn_end")

_encode_json = msgspec.json.Encoder().encode


def new_id() -> str:
    return secrets.token_hex(16)


class SessionService(Service):
    name = "session"
    concurrency = 16  # closes may wait for container removal; keep threads free for everything else

    def __init__(
        self,
        store: SessionStore,
        config: Config,
        *,
        events: Publisher,
        policy: Peer,
        containers: Peer,
        clock: Callable[[], float] = time.time,
    ):
        self.store = store
        self.limits = config.session
        self.host_max_containers = config.policy.max_containers
        self.events = events
        self.policy = policy
        self.containers = containers
        self.clock = clock
        self._stopping = threading.Event()
        self.reaper = ContainerReaper(float(self.limits.close_timeout), self._stopping, containers)
        self._closers: dict[str, threading.Thread] = {}
        self._closers_lock = threading.Lock()
        self._containers_reconciled = False
        self.quotas = SessionQuotas.for_limits(config.limits)  # what agents may cause, per session

    @classmethod
    def from_config(cls, config: Config, bus: BusClient) -> "SessionService":
        timeout = float(config.bus.call_timeout)
        return cls(
            SessionStore.in_data_dir(config.data_dir),
            config,
            events=bus,
            policy=Peer(bus, "policy", timeout=timeout),
            containers=Peer(bus, "container", timeout=timeout),
        )

    # -- life cycle ---------------------------------------------------------------------------

    def on_stop(self) -> None:
        self._stopping.set()
        self.reaper.wake()
        deadline = time.monotonic() + STOP_TIMEOUT
        with self._closers_lock:
            workers = list(self._closers.values())
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        self.store.close()

    # -- sessions -----------------------------------------------------------------------------

    @rpc
    def create(self, req: SessionCreate, ctx: CallContext) -> SessionInfo:
        require_host(ctx.caller, "create sessions")
        # The caller owns what it creates, unless it names another owner on whose behalf it acts.
        creator = name_of(ctx.caller)
        owner = req.owner or creator
        validation.text("owner", owner, validation.MAX_OWNER, required=True)
        validation.text("name", req.name, validation.MAX_NAME)
        validation.text("description", req.description, validation.MAX_DESCRIPTION, prose=True)
        validation.labels(req.labels)
        validation.tags(req.tags)
        validation.settings(req.settings, self.host_max_containers)
        if req.settings.policy_override:
            self._check_policy_override(req.settings.policy_override, ctx)
        now = self.clock()
        session_id = new_id()
        session = SessionInfo(
            id=session_id,
            state=states.move(session_id, INITIALIZING, ACTIVE, "create a session"),
            owner=owner,
            created_by=creator,
            name=req.name,
            description=req.description,
            labels=req.labels,
            tags=req.tags,
            settings=req.settings,
            created_at=now,
            updated_at=now,
            last_activity_at=now,
            expires_at=now + req.settings.max_duration if req.settings.max_duration else 0.0,
        )

        def insert(tx: Transaction) -> None:
            open_sessions = tx.count_not_closed()
            if open_sessions >= self.limits.max_sessions:
                raise exhausted(
                    f"{open_sessions} sessions are not closed, the limit session.max_sessions is"
                    f" {self.limits.max_sessions}: close one first",
                    limit=self.limits.max_sessions,
                )
            tx.insert(session)
            self._publish_after(tx, SessionCreated(session=session))

        self.store.write(insert)
        log.info("session created", extra={"session_id": session_id, "owner": owner, "created_by": creator})
        return session

    def _check_policy_override(self, override: dict, ctx: CallContext) -> None:
        """Ask the policy engine whether the override fits: it may only tighten the host policy."""
        try:
            result = self.policy.validate(ctx, text=_encode_json(override).decode(), as_override=True)
        except BusError as exc:
            raise BusError(
                exc.code, f"cannot check settings.policy_override: {exc.message}", exc.details
            ) from None
        if not result.valid:
            problems = "; ".join(f"{error.path}: {error.message}" for error in result.errors)
            raise invalid(
                f"settings.policy_override is refused by the policy engine: {problems}",
                field="settings.policy_override",
                errors=[{"path": error.path, "message": error.message} for error in result.errors],
            )

    @rpc(inline=True)
    def get(self, req: SessionGet, ctx: CallContext) -> SessionInfo:
        require_session(ctx.caller, req.session_id, "read")
        return self._existing(req.session_id)

    @rpc
    def list(self, req: SessionList, ctx: CallContext) -> SessionPage:
        require_host(ctx.caller, "list sessions")
        validation.labels(req.labels)
        sessions, next_cursor = self.store.list(req.states, req.owner, req.labels, req.limit, req.cursor)
        return SessionPage(sessions=sessions, next_cursor=next_cursor)

    @rpc
    def update(self, req: SessionUpdate, ctx: CallContext) -> SessionInfo:
        require_host(ctx.caller, "update sessions")
        if req.name is not None:
            validation.text("name", req.name, validation.MAX_NAME)
        if req.description is not None:
            validation.text("description", req.description, validation.MAX_DESCRIPTION, prose=True)
        if req.labels is not None:
            validation.labels(req.labels)
        if req.tags is not None:
            validation.tags(req.tags)
        if req.current_task_id is not None:
            validation.text("current_task_id", req.current_task_id, MAX_ID)

        def change(tx: Transaction) -> SessionInfo:
            session = self._for_change(tx, req.session_id)
            require_live(session, "update")
            for field in ("name", "description", "labels", "tags"):
                value = getattr(req, field)
                if value is not None:
                    setattr(session, field, value)
            if req.current_task_id is not None and req.current_task_id != session.current_task_id:
                if session.current_task_id:
                    session.task_history.append(session.current_task_id)
                session.current_task_id = req.current_task_id
            session.updated_at = self.clock()
            tx.put(session)
            self._announce(tx, session, "metadata")
            return session

        return self.store.write(change)

    @rpc
    def close(self, req: SessionClose, ctx: CallContext) -> SessionInfo:
        require_host(ctx.caller, "close sessions")
        validation.text("reason", req.reason, validation.MAX_DESCRIPTION, prose=True)
        session = self.begin_close(req.session_id, req.reason or CLOSED_ON_REQUEST)
        if session.state is CLOSED or not req.wait:
            return session
        worker = self._closer(session.id)
        # Answer with the state reached so far rather than let the caller time out.
        worker.join(max(0.0, min(ctx.remaining() - ANSWER_MARGIN, self.limits.close_timeout + CLOSE_SLACK)))
        return self._existing(session.id)

    @rpc
    def delete(self, req: SessionDelete, ctx: CallContext) -> Empty:
        require_host(ctx.caller, "delete sessions")

        def remove(tx: Transaction) -> None:
            session = self._for_change(tx, req.session_id)
            if session.state is not CLOSED:
                raise precondition(
                    f"cannot delete session {session.id}: it is {session.state.value}, close it first",
                    session_id=session.id,
                    state=session.state.value,
                )
            tx.delete(session.id)
            self._publish_after(tx, SessionDeleted(session_id=session.id, owner=session.owner))

        self.store.write(remove)
        log.info("session deleted", extra={"session_id": req.session_id})
        return Empty()

    # -- conversation -------------------------------------------------------------------------

    @rpc(inline=True)
    def send_message(self, req: SessionSendMessage, ctx: CallContext) -> Deferred:
        """Answered with the stored Message once it is committed: the store's committer settles the
        answer, so this handler thread does not wait for the commit."""
        require_session(ctx.caller, req.session_id, "write messages to")
        req = authored(req, ctx)
        size = validation.message_size(req.content, req.metadata, int(self.limits.max_message_size))
        for field in ("tool_name", "tool_call_id", "container_id"):
            validation.text(f"metadata.{field}", getattr(req.metadata, field), MAX_ID)
        if not is_host(ctx.caller):  # both or neither: a refused message spends none of its bytes
            self._charge(req.session_id, {"messages": 1, "message_bytes": size})
        now = self.clock()
        sender = name_of(ctx.caller)

        def append(tx: Transaction) -> Message | SessionInfo:
            """The message appended, or the session when it expired: closed now instead."""
            session = self._for_change(tx, req.session_id)
            if session.state not in LIVE:
                raise precondition(
                    f"session {session.id} is {session.state.value}: it takes no more messages",
                    session_id=session.id,
                    state=session.state.value,
                )
            if 0 < session.expires_at <= now:
                # The sweep has not got to it yet: close it now rather than let the conversation go on.
                self._move_to_closing(tx, session, EXPIRED)
                return session
            return self._append(tx, session, req, now, sender)

        answer = Deferred()

        def settle(appended: Message | SessionInfo | None, error: BaseException | None) -> None:
            if not isinstance(appended, SessionInfo):
                answer.settle(appended, error)
                return
            self._closing_begun(appended.id, EXPIRED)
            expired = precondition(
                f"cannot add a message: session {appended.id} expired (max_duration"
                f" {appended.settings.max_duration:g}s) and is being closed",
                session_id=appended.id,
                state=CLOSING.value,
            )
            answer.settle(error=expired)

        self.store.submit(append, settle)
        return answer

    def _charge(self, session_id: str, amounts: dict[str, int]) -> None:
        """Count what an agent causes in a session against the session's quotas (common/session_quotas.py):
        each message is at most session.max_message_size, which the bytes' quota holds (config_rules)."""
        refusal = self.quotas.refusal(session_id, amounts, time.monotonic())
        if refusal is not None:
            raise exhausted(refusal.message, session_id=session_id, kind=refusal.kind)

    def _append(
        self, tx: Transaction, session: SessionInfo, req: SessionSendMessage, now: float, sender: str
    ) -> Message:
        previous = session.state
        if previous is not ACTIVE:
            session.state = states.move(session.id, previous, ACTIVE, "add a message")
        message = Message(
            id=new_id(),
            seq=session.message_count + 1,
            time=now,
            role=req.role,
            content=req.content,
            metadata=req.metadata,
            sender=sender,
        )
        session.message_count = message.seq
        session.last_activity_at = session.updated_at = now
        tx.put(session)
        tx.append_message(session.id, message)
        self._publish_after(tx, SessionMessage(session_id=session.id, message=message))
        if previous is not ACTIVE:
            self._announce(tx, session, "state", previous)
        return message

    @rpc
    def cancel(self, req: SessionCancel, ctx: CallContext) -> Empty:
        """Publish `session.cancel/<S>`: the session's assistant stops its turn and records it."""
        require_session(ctx.caller, req.session_id, "cancel the turn of")
        validation.text("reason", req.reason, validation.MAX_DESCRIPTION, prose=True)
        session = self._existing(req.session_id)
        require_live(session, "cancel the turn of")
        if not is_host(ctx.caller):  # each is an event and a log line: an agent's loop of them is bounded
            self._charge(req.session_id, {"cancels": 1})
        requested_by = name_of(ctx.caller)
        self.events.publish(
            SessionCancelled(session_id=session.id, requested_by=requested_by, reason=req.reason)
        )
        log.info("turn cancel requested", extra={"session_id": session.id, "requested_by": requested_by})
        return Empty()

    @rpc
    def messages(self, req: SessionMessages, ctx: CallContext) -> MessagePage:
        require_session(ctx.caller, req.session_id, "read messages of")
        session = self._existing(req.session_id)
        found, next_cursor = self.store.messages(
            session.id,
            newest_first=req.order == "newest",
            limit=req.limit,
            cursor=req.cursor,
        )
        return MessagePage(messages=found, next_cursor=next_cursor)

    # -- containers ---------------------------------------------------------------------------

    @rpc
    def attach_container(self, req: SessionAttachContainer, ctx: CallContext) -> SessionInfo:
        require_host(ctx.caller, "attach containers to sessions")

        def attach(tx: Transaction) -> SessionInfo:
            session = self._for_change(tx, req.session_id)
            require_live(session, "attach a container to")
            if any(c.id == req.container_id for c in session.containers):
                raise BusError(
                    ErrorCode.ALREADY_EXISTS,
                    f"container {req.container_id} is already attached to session {session.id}",
                    {"session_id": session.id, "container_id": req.container_id},
                )
            limit = self.max_containers(session)
            if len(session.containers) >= limit:
                raise exhausted(
                    f"session {session.id} already has {len(session.containers)} containers,"
                    f" its limit max_containers is {limit}",
                    session_id=session.id,
                    limit=limit,
                )
            session.containers.append(SessionContainer(id=req.container_id, attached_at=self.clock()))
            session.updated_at = self.clock()
            tx.put(session)
            self._announce(tx, session, "containers")
            return session

        return self.store.write(attach)

    @rpc
    def detach_container(self, req: SessionDetachContainer, ctx: CallContext) -> SessionInfo:
        require_host(ctx.caller, "detach containers from sessions")

        def detach(tx: Transaction) -> SessionInfo:
            session = self._for_change(tx, req.session_id)
            if not self._drop_container(tx, session, req.container_id):
                raise not_found(
                    f"container {req.container_id} is not attached to session {session.id}",
                    session_id=session.id,
                    container_id=req.container_id,
                )
            return session

        return self.store.write(detach)

    def max_containers(self, session: SessionInfo) -> int:
        """The session's own limit, never above the host's current one."""
        return min(session.settings.max_containers or self.host_max_containers, self.host_max_containers)

    @on_event("container.removed")
    def on_container_removed(self, event: ContainerRemoved) -> None:

        def forget(tx: Transaction) -> None:
            for session in tx.holding_container(event.container_id):
                self._drop_container(tx, session, event.container_id)

        self.store.write(forget)
        self.reaper.removed(event.container_id)

    @on_event("container.died")
    def on_container_died(self, event: ContainerDied) -> None:

        def mark_exited(tx: Transaction) -> None:
            for session in tx.holding_container(event.container_id):
                for container in session.containers:
                    if container.id == event.container_id and not container.exited:
                        container.exited = True
                        session.updated_at = self.clock()
                        tx.put(session)
                        self._announce(tx, session, "containers")

        self.store.write(mark_exited)

    def _drop_container(self, tx: Transaction, session: SessionInfo, container_id: str) -> bool:
        kept = [c for c in session.containers if c.id != container_id]
        if len(kept) == len(session.containers):
            return False
        session.containers = kept
        session.updated_at = self.clock()
        tx.put(session)
        self._announce(tx, session, "containers")
        return True

    # -- idleness, expiry and closing ---------------------------------------------------------

    @background(every=lambda self: float(self.limits.sweep_interval), marks_unhealthy=True)
    def sweep(self) -> None:
        """One pass: idle sessions go idle, expired ones are closed, interrupted closings resume,
        and (until it has worked once) containers removed while we were down are forgotten."""
        if not self._containers_reconciled:
            self._containers_reconciled = self._reconcile_containers()
        self.quotas.prune(time.monotonic())
        now = self.clock()
        for session in self.store.in_states((ACTIVE, IDLE, CLOSING)):
            if session.state is CLOSING:
                self._closer(session.id)
            elif session.expires_at and now >= session.expires_at:
                self.begin_close(session.id, EXPIRED)
            elif session.state is ACTIVE and now - session.last_activity_at >= self.idle_timeout(session):
                self._go_idle(session.id)

    def _reconcile_containers(self) -> bool:
        """Drop attached containers the container manager no longer has: their `container.removed`
        events went by while this service was not listening. False if it could not be asked."""
        for session in self.store.in_states(LIVE):
            if not session.containers:
                continue
            asked_at = self.clock()
            try:
                listed = self.containers.list(None, session_id=session.id)
            except BusError as exc:
                log.info("container list not reconciled yet", extra={"reason": exc.message})
                return False
            present = {container.id for container in listed.containers}
            self.store.write(
                functools.partial(
                    self._drop_absent, session_id=session.id, present=present, asked_at=asked_at
                )
            )
        return True

    def _drop_absent(self, tx: Transaction, session_id: str, present: set[str], asked_at: float) -> None:
        current = tx.get(session_id)
        if current is None:
            return
        # Containers attached after the question was asked are not in its answer.
        gone = [c.id for c in current.containers if c.id not in present and c.attached_at < asked_at]
        for container_id in gone:
            self._drop_container(tx, current, container_id)

    def idle_timeout(self, session: SessionInfo) -> float:
        return session.settings.idle_timeout or float(self.limits.timeout)

    def _go_idle(self, session_id: str) -> None:
        def change(tx: Transaction) -> bool:
            session = tx.get(session_id)
            # Re-checked inside the transaction: a message may have arrived since the sweep looked.
            now = self.clock()
            if session is None or session.state is not ACTIVE:
                return False
            if now - session.last_activity_at < self.idle_timeout(session):
                return False
            session.state = states.move(session.id, ACTIVE, IDLE, "mark the session idle")
            session.updated_at = now
            tx.put(session)
            idle = SessionIdle(
                session_id=session.id, owner=session.owner, last_activity_at=session.last_activity_at
            )
            self._publish_after(tx, idle)
            self._announce(tx, session, "state", ACTIVE)
            return True

        if self.store.write(change):
            log.info("session idle", extra={"session_id": session_id})

    def begin_close(self, session_id: str, reason: str) -> SessionInfo:
        """Move the session to closing (no change if it is closing or closed already) and make
        sure the removal of its containers runs."""

        def change(tx: Transaction) -> tuple[SessionInfo, bool]:
            session = self._for_change(tx, session_id)
            if session.state in (CLOSING, CLOSED):
                return session, False
            self._move_to_closing(tx, session, reason)
            return session, True

        session, moved = self.store.write(change)
        if moved:
            self._closing_begun(session_id, reason)
        return session

    def _move_to_closing(self, tx: Transaction, session: SessionInfo, reason: str) -> None:
        previous = session.state
        session.state = states.move(session.id, previous, CLOSING, "close the session")
        session.close_reason = reason
        session.updated_at = self.clock()
        tx.put(session)
        self._announce(tx, session, "state", previous)

    def _closing_begun(self, session_id: str, reason: str) -> None:
        """Once the move to closing is committed: the removal of its containers runs."""
        log.info("session closing", extra={"session_id": session_id, "reason": reason})
        self._closer(session_id)

    def _closer(self, session_id: str) -> threading.Thread:
        """The one thread finishing this session's closing, started if none runs."""
        with self._closers_lock:
            worker = self._closers.get(session_id)
            if worker is None:
                worker = threading.Thread(
                    target=self._finish_close,
                    args=(session_id,),
                    name=f"session-close-{session_id[:8]}",
                    daemon=True,
                )
                self._closers[session_id] = worker
                worker.start()
            return worker

    def _finish_close(self, session_id: str) -> None:
        try:
            session = self.store.get(session_id)
            if session is None or session.state is not CLOSING:
                return
            remaining = self.reaper.remove_all(session_id, [c.id for c in session.containers])
            if self._stopping.is_set():
                return  # shutting down: the next start resumes the closing
            if not self.store.write(lambda tx: self._mark_closed(tx, session_id, remaining)):
                return
            log.info("session closed", extra={"session_id": session_id, "remaining_containers": remaining})
        except Exception:
            # Left in closing: the next sweep tries again.
            log.exception("closing a session failed", extra={"session_id": session_id})
        finally:
            with self._closers_lock:
                self._closers.pop(session_id, None)

    def _mark_closed(self, tx: Transaction, session_id: str, remaining: list[str]) -> bool:
        session = tx.get(session_id)
        if session is None or session.state is not CLOSING:
            return False
        session.state = states.move(session.id, CLOSING, CLOSED, "finish closing")
        session.closed_at = session.updated_at = self.clock()
        session.containers = [c for c in session.containers if c.id in remaining]
        tx.put(session)
        self._announce(tx, session, "state", CLOSING)
        closed = SessionClosed(
            session_id=session.id,
            owner=session.owner,
            reason=session.close_reason,
            remaining_containers=remaining,
        )
        self._publish_after(tx, closed)
        return True

    # -- helpers ------------------------------------------------------------------------------

    def _existing(self, session_id: str) -> SessionInfo:
        session = self.store.get(session_id)
        if session is None:
            raise not_found(f"no session {session_id}", session_id=session_id)
        return session

    @staticmethod
    def _for_change(tx: Transaction, session_id: str) -> SessionInfo:
        session = tx.get(session_id)
        if session is None:
            raise not_found(f"no session {session_id}", session_id=session_id)
        return session

    def _announce(
        self, tx: Transaction, session: SessionInfo, change: str, previous: SessionState | None = None
    ) -> None:
        self._publish_after(tx, SessionUpdated(session=session, change=change, previous_state=previous))

    def _publish_after(self, tx: Transaction, event: Event) -> None:
        """Publish the event once the change is committed. The store's committer runs commit actions in
        change order before the next group's changes, and the bus connection sends in the order it is
        given messages, so events leave in commit order."""
        tx.after_commit(lambda: self.events.publish(event))


def authored(req: SessionSendMessage, ctx: CallContext) -> SessionSendMessage:
    """The message as its author may send it. An agent speaks only for itself: never as the user or the
    host (`user`, `system`), only the session's assistant writes turn metadata (TURN_FIELDS), and the
    container named in its metadata is its own, whatever it claims."""
    caller = ctx.caller
    if role_of(caller) not in AGENT_ROLES:
        return req
    if req.role in HOST_MESSAGE_ROLES:
        raise denied(
            f"{role_of(caller)} callers may not send {req.role!r} messages (those are the user's and the "
            "host's)",
            caller,
            session_id=req.session_id,
            message_role=req.role,
        )
    forged = [f for f in TURN_FIELDS if getattr(req.metadata, f)] if role_of(caller) != ASSISTANT else []
    if forged:
        raise denied(
            f"{role_of(caller)} callers may not write metadata.{forged[0]} (the assistant protocol's turn "
            "metadata is the session's assistant's)",
            caller,
            session_id=req.session_id,
            field=f"metadata.{forged[0]}",
        )
    claimed = req.metadata.container_id
    if claimed and claimed != caller.container:
        raise denied(
            f"metadata.container_id {claimed} is not the caller's container {caller.container}",
            caller,
            session_id=req.session_id,
            field="metadata.container_id",
        )
    metadata = msgspec.structs.replace(req.metadata, container_id=caller.container)
    return msgspec.structs.replace(req, metadata=metadata)


def require_live(session: SessionInfo, action: str) -> None:
    """FAILED_PRECONDITION naming the session and its state unless it is active or idle."""
    if session.state not in LIVE:
        raise precondition(
            f"cannot {action} session {session.id}: it is {session.state.value}",
            session_id=session.id,
            state=session.state.value,
        )
