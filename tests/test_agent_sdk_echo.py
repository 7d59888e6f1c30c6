"""The echo agent's work on a fake agent (pure): what it answers, and how."""

from __future__ import annotations

import msgspec

from baaaht.agent.main import echo
from baaaht.bus.subscription import Delivery
from baaaht.bus.testing import run_async
from baaaht.schemas.sessions import Message, SessionMessage, SessionSendMessage

SESSION = "s" * 32


def delivered(seq: int, role: str, content: str, session: str = SESSION) -> Delivery:
    message = Message(id=f"m{seq}", seq=seq, time=0.0, role=role, content=content)
    event = SessionMessage(session_id=session, message=message)
    return Delivery(seq, 0.0, f"session.message/{session}", "session", msgspec.msgpack.encode(event))


class FakeAgent:
    def __init__(self, deliveries: list[Delivery]):
        self.deliveries = deliveries
        self.subscribed: list[tuple] = []
        self.calls: list = []

    async def subscribe(self, topics, since=None):
        self.subscribed.append((topics, since))
        for delivery in self.deliveries:
            yield delivery

    async def call(self, request):
        self.calls.append(request)


def test_echo_answers_user_messages_only_with_the_same_text_in_their_session():
    agent = FakeAgent(
        [
            delivered(1, "user", "hello"),
            delivered(2, "assistant", "hello"),  # its own answer: not answered again
            delivered(3, "system", "note"),
            delivered(4, "user", "again", session="t" * 32),
        ]
    )
    run_async(echo(agent), timeout=5)
    assert agent.subscribed == [(["session.message"], 0)]
    assert agent.calls == [
        SessionSendMessage(session_id=SESSION, role="assistant", content="hello"),
        SessionSendMessage(session_id="t" * 32, role="assistant", content="again"),
    ]
