"""The rule table behind authorize(): a pure function, tested as a table."""

import pytest

from baaaht.bus.authorize import AGENT, ANSWER, CALL, OPERATOR, PUBLISH, REGISTER, RULES, SERVICE, authorize

ALLOWED, DENIED = True, False

TABLE = [
    # the services socket: everything, as before roles
    (SERVICE, CALL, "session.create", ALLOWED),
    (SERVICE, CALL, "bus.events.replay", ALLOWED),
    (SERVICE, ANSWER, "echo.say", ALLOWED),
    (SERVICE, PUBLISH, "session.created", ALLOWED),
    (SERVICE, REGISTER, "echo", ALLOWED),
    (OPERATOR, CALL, "bus.peers", ALLOWED),
    (OPERATOR, PUBLISH, "policy.reloaded", ALLOWED),
    (OPERATOR, REGISTER, "echo", ALLOWED),
    # agents: service methods and bus.ping; agent.* events; never register or answer
    (AGENT, CALL, "bus.ping", ALLOWED),
    (AGENT, CALL, "container.create", ALLOWED),
    (AGENT, CALL, "bus.events.replay", DENIED),
    (AGENT, CALL, "bus.peers", DENIED),
    (AGENT, CALL, "bus.services", DENIED),
    (AGENT, CALL, "bus.stats", DENIED),
    (AGENT, CALL, "bus.pingx", DENIED),
    (AGENT, CALL, "container.exec", DENIED),
    (AGENT, CALL, "container.volume_create", DENIED),
    (AGENT, CALL, "container.volume_list", DENIED),
    (AGENT, CALL, "policy.audit_verify", DENIED),
    (AGENT, CALL, "policy.audit_tail", DENIED),
    (AGENT, CALL, "container.execx", ALLOWED),
    (AGENT, PUBLISH, "agent.progress", ALLOWED),
    (AGENT, PUBLISH, "agent.", ALLOWED),
    (AGENT, PUBLISH, "agentx", DENIED),
    (AGENT, PUBLISH, "session.created", DENIED),
    (AGENT, PUBLISH, "", DENIED),
    (AGENT, REGISTER, "session", DENIED),
    (AGENT, ANSWER, "echo.say", DENIED),
    # default deny
    ("stranger", CALL, "bus.ping", DENIED),
    (SERVICE, "teleport", "anything", DENIED),
]


@pytest.mark.parametrize("role, action, target, allowed", TABLE)
def test_the_rule_table(role, action, target, allowed):
    assert (authorize(role, action, target) is None) == allowed


def test_a_denial_names_the_role_the_action_and_what_is_allowed():
    denial = authorize(AGENT, PUBLISH, "session.created")
    assert denial.message == "agent peers may not publish 'session.created' (allowed: agent.*)"
    assert "allowed: nothing" in authorize(AGENT, REGISTER, "x").message


def test_every_role_in_the_table_is_tested():
    assert {row[0] for row in TABLE} >= set(RULES)
