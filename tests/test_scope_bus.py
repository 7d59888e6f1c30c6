"""Session scope end to end: a real broker, the session and policy services, and an agent peer on the
agent socket. Who asked is what the broker stamped, never a field of the request."""

from __future__ import annotations

import pytest

from baaaht.bus.client import BusClient
from baaaht.bus.testing import error_of
from baaaht.schemas.containers import ContainerSpec
from baaaht.schemas.errors import ErrorCode
from baaaht.schemas.policy import PolicyAuditTail, PolicyAuditVerify, PolicyEvaluate, Principal
from baaaht.schemas.sessions import SessionCreate, SessionGet, SessionMessages, SessionSendMessage
from baaaht.services.policy import audit

FORGED = "operator-forged-by-agent"


@pytest.fixture
def scoped(make_host):
    host = make_host()
    host.start_service("baaaht.services.policy", "policy")
    host.start_service("baaaht.services.sessions", "session")
    return host


def agent_client(host, session: str = "agent-session") -> BusClient:
    """A peer on the agent socket, as an agent in a container of `session` connects (the kit's broker
    takes this process for a process of a container with that identity)."""
    host.identify(session)
    return host.agent_client()


def test_an_agent_cannot_read_or_write_another_sessions_messages(scoped):
    operator = scoped.client()
    other = operator.call(SessionCreate(owner="bob"))
    operator.call(SessionSendMessage(session_id=other.id, content="bob's secret"))
    before = operator.call(SessionGet(session_id=other.id))
    agent = agent_client(scoped)
    for request in (
        SessionMessages(session_id=other.id),
        SessionGet(session_id=other.id),
        SessionSendMessage(session_id=other.id, role="assistant", content="forged"),
    ):
        error = error_of(lambda request=request: agent.call(request, timeout=5.0))
        assert error.code is ErrorCode.PERMISSION_DENIED, request
        assert other.id in error.message
    assert operator.call(SessionGet(session_id=other.id)) == before
    messages = operator.call(SessionMessages(session_id=other.id)).messages
    assert [m.content for m in messages] == ["bob's secret"]
    assert messages[0].sender.startswith("operator/uid=")


def test_a_forged_principal_never_reaches_the_audit_log(scoped):
    agent = agent_client(scoped)
    forged = PolicyEvaluate(spec=ContainerSpec(image="busybox:1"), principal=Principal(user=FORGED))
    assert error_of(lambda: agent.call(forged, timeout=5.0)).code is ErrorCode.PERMISSION_DENIED
    operator = scoped.client()
    operator.call(PolicyEvaluate(spec=ContainerSpec(image="busybox:1"), principal=Principal(user="alice")))
    records = [r for batch in operator.stream(PolicyAuditTail(limit=100)) for r in batch.records]
    evaluated = [r for r in records if r.action == "container.create"]
    assert [r.principal.user for r in evaluated] == ["alice"]
    assert evaluated[0].asked_by.socket == "services"
    assert FORGED.encode() not in audit.log_path(scoped.data_dir).read_bytes()
    assert operator.call(PolicyAuditVerify()).ok
