"""The rule table behind authorize(): pure functions, tested as a table, every role."""

import pytest

from baaaht.bus.authorize import (
    AGENT,
    ANSWER,
    ASSISTANT,
    CALL,
    OPERATOR,
    PUBLISH,
    RECEIVE,
    REFUSED,
    REGISTER,
    RULES,
    SERVICE,
    UNIDENTIFIED,
    WORKER,
    authorize,
    kept_as_agents,
    may_receive,
    publish_topic,
    rules_table,
)

ALLOWED, DENIED = True, False
AGENT_ROLES = (AGENT, ASSISTANT, WORKER)
# What no agent role may ever call (issue 10): the host's machinery and other sessions.
NEVER_FOR_AGENTS = [
    "container.create",
    "container.destroy",
    "container.reconcile",
    "container.exec",
    "container.volume_create",
    "policy.reload",
    "policy.evaluate",
    "policy.get",
    "policy.audit_tail",
    "session.list",
    "session.create",
    "session.close",
    "session.delete",
    "session.update",
    "credential.put",
    "credential.list",
    "bus.peers",
    "bus.services",
    "bus.stats",
    "bus.agents.list",
    "bus.agents.update",
    "bus.auth.rules",
    "bus.pingx",
]

TABLE = [
    # services: call and answer anything; register; publish their own domain's topics
    (SERVICE, CALL, "session.create", ALLOWED),
    (SERVICE, CALL, "bus.agents.update", ALLOWED),
    (SERVICE, ANSWER, "echo.say", ALLOWED),
    (SERVICE, REGISTER, "echo", ALLOWED),
    (SERVICE, RECEIVE, "session.message", DENIED),
    # the operator: calls anything but bus.agents.update; publishes and answers nothing
    (OPERATOR, CALL, "bus.peers", ALLOWED),
    (OPERATOR, CALL, "credential.put", ALLOWED),
    (OPERATOR, CALL, "bus.agents.list", ALLOWED),
    (OPERATOR, CALL, "bus.agents.update", DENIED),
    (OPERATOR, PUBLISH, "policy.reloaded", DENIED),
    (OPERATOR, PUBLISH, "agent.progress", DENIED),
    (OPERATOR, ANSWER, "echo.say", DENIED),
    (OPERATOR, REGISTER, "echo", ALLOWED),
    # a plain agent: its session's conversation, ping and replay; agent.* events
    (AGENT, CALL, "bus.ping", ALLOWED),
    (AGENT, CALL, "bus.events.replay", ALLOWED),
    (AGENT, CALL, "session.get", ALLOWED),
    (AGENT, CALL, "session.messages", ALLOWED),
    (AGENT, CALL, "session.send_message", ALLOWED),
    (AGENT, CALL, "session.cancel", ALLOWED),
    (AGENT, CALL, "session.getx", DENIED),
    (AGENT, CALL, "task.submit", DENIED),
    (AGENT, CALL, "task.work", DENIED),
    (AGENT, PUBLISH, "agent.progress", ALLOWED),
    (AGENT, PUBLISH, "agentx", DENIED),
    (AGENT, PUBLISH, "session.created", DENIED),
    (AGENT, PUBLISH, "", DENIED),
    (AGENT, REGISTER, "session", DENIED),
    (AGENT, ANSWER, "echo.say", DENIED),
    (AGENT, RECEIVE, "session.message", ALLOWED),
    (AGENT, RECEIVE, "agent.progress", ALLOWED),
    (AGENT, RECEIVE, "task.queued", DENIED),
    (AGENT, RECEIVE, "container.removed", DENIED),
    # the assistant: and submits tasks to its session's workers, sees them
    (ASSISTANT, CALL, "task.submit", ALLOWED),
    (ASSISTANT, CALL, "session.send_message", ALLOWED),
    (ASSISTANT, CALL, "task.wait", ALLOWED),
    (ASSISTANT, CALL, "task.cancel", ALLOWED),
    (ASSISTANT, CALL, "task.progress", DENIED),
    (ASSISTANT, CALL, "task.work", DENIED),
    (ASSISTANT, RECEIVE, "task.succeeded", ALLOWED),
    (ASSISTANT, RECEIVE, "session.message", ALLOWED),
    (ASSISTANT, RECEIVE, "session.cancel", ALLOWED),
    (ASSISTANT, CALL, "session.cancel", ALLOWED),
    (WORKER, CALL, "session.cancel", DENIED),
    # the assistant's answer as it is generated: its own event, no other agent's
    (ASSISTANT, PUBLISH, "session.partial", ALLOWED),
    (ASSISTANT, PUBLISH, "session.message", DENIED),
    (AGENT, PUBLISH, "session.partial", DENIED),
    (WORKER, PUBLISH, "session.partial", DENIED),
    # a worker: takes and reports its session's tasks, nothing of the conversation
    (WORKER, CALL, "task.work", ALLOWED),
    (WORKER, CALL, "task.ack", ALLOWED),
    (WORKER, CALL, "task.heartbeat", ALLOWED),
    (WORKER, CALL, "task.complete", ALLOWED),
    (WORKER, CALL, "task.progress", ALLOWED),
    (WORKER, CALL, "task.wait", DENIED),
    (WORKER, CALL, "task.submit", DENIED),
    (WORKER, CALL, "session.messages", DENIED),
    (WORKER, RECEIVE, "session.closed", ALLOWED),
    (WORKER, RECEIVE, "session.message", DENIED),
    (WORKER, PUBLISH, "agent.progress", ALLOWED),
    # no identity: a ping, nothing else
    (UNIDENTIFIED, CALL, "bus.ping", ALLOWED),
    (UNIDENTIFIED, CALL, "bus.events.replay", DENIED),
    (UNIDENTIFIED, CALL, "session.get", DENIED),
    (UNIDENTIFIED, PUBLISH, "agent.progress", DENIED),
    (UNIDENTIFIED, RECEIVE, "session.message", DENIED),
    # a foreign uid on the services socket: nothing at all
    (REFUSED, CALL, "bus.ping", DENIED),
    (REFUSED, REGISTER, "echo", DENIED),
    # default deny
    ("stranger", CALL, "bus.ping", DENIED),
    (SERVICE, "teleport", "anything", DENIED),
]


@pytest.mark.parametrize("role, action, target, allowed", TABLE)
def test_the_rule_table(role, action, target, allowed):
    assert (authorize(role, action, target) is None) == allowed


@pytest.mark.parametrize("role", AGENT_ROLES)
@pytest.mark.parametrize("target", NEVER_FOR_AGENTS)
def test_no_agent_role_reaches_the_hosts_machinery(role, target):
    assert authorize(role, CALL, target) is not None
    assert authorize(role, REGISTER, target.partition(".")[0]) is not None
    assert authorize(role, ANSWER, target) is not None


@pytest.mark.parametrize(
    "service, topic, allowed",
    [
        ("container", "container.removed", ALLOWED),
        ("container", "image.pulled", ALLOWED),
        ("container", "session.closed", DENIED),
        ("session", "session.message", ALLOWED),
        ("session", "policy.reloaded", DENIED),
        ("policy", "policy.reloaded", ALLOWED),
        ("credential", "egress.usage", ALLOWED),
        ("task", "schedule.fired", ALLOWED),
        ("task", "task.queued", ALLOWED),
        ("echo", "echo.shouted", ALLOWED),  # a service not in DOMAINS: its own name's topics
        ("echo", "echoes.x", DENIED),
        ("echo", "bus.service.up", DENIED),
        ("echo", "agent.progress", DENIED),
    ],
)
def test_a_service_publishes_only_its_domains_topics(service, topic, allowed):
    assert (authorize(SERVICE, PUBLISH, topic, service) is None) == allowed


def test_a_denial_names_the_role_the_action_and_what_is_allowed():
    denial = authorize(AGENT, PUBLISH, "session.created")
    assert denial.message == "agent peers may not publish 'session.created' (allowed: agent.*)"
    assert "allowed: nothing" in authorize(AGENT, REGISTER, "x").message
    assert authorize(SERVICE, PUBLISH, "policy.x", "session").message.startswith("service 'session' may not")


def test_an_agents_event_is_published_in_its_own_session_only():
    assert publish_topic(AGENT, "s1", "agent.progress") == ("agent.progress/s1", None)
    assert publish_topic(WORKER, "s1", "agent.progress/s1") == ("agent.progress/s1", None)
    topic, denial = publish_topic(AGENT, "s1", "agent.progress/s2")
    assert denial is not None and "'s2'" in denial.message
    assert publish_topic(AGENT, "s1", "session.message/s1")[1] is not None
    assert publish_topic(ASSISTANT, "s1", "session.partial") == ("session.partial/s1", None)
    assert publish_topic(ASSISTANT, "s1", "session.partial/s2")[1] is not None
    # host peers publish on the topic they name, any session's
    assert publish_topic(SERVICE, "", "session.message/s2", "session") == ("session.message/s2", None)


@pytest.mark.parametrize(
    "role, session, topic, received",
    [
        (AGENT, "s1", "session.message/s1", True),
        (AGENT, "s1", "session.message/s2", False),  # another session's
        (AGENT, "s1", "session.message", False),  # host-wide: never to an agent
        (AGENT, "", "session.message/", False),  # no session: nothing
        (AGENT, "s1", "session.message/s10", False),  # a session whose id starts with its own
        (AGENT, "s1", "container.removed/s1", False),  # its session's, but not a tag it may receive
        (WORKER, "s1", "task.queued/s1", True),
        (WORKER, "s1", "session.message/s1", False),
        (UNIDENTIFIED, "", "session.message/", False),
    ],
)
def test_which_events_an_agent_is_sent(role, session, topic, received):
    assert may_receive(role, session, topic) == received


def test_every_role_in_the_table_is_tested():
    assert {row[0] for row in TABLE} >= set(RULES)


def test_the_served_table_is_every_role_and_action():
    table = rules_table()
    assert {(role, action) for role, action, _rules in table} == {
        (r, a) for r in RULES for a in (CALL, ANSWER, PUBLISH, REGISTER, RECEIVE)
    }
    assert (WORKER, CALL, list(RULES[WORKER][CALL])) in table


@pytest.mark.parametrize(
    "topic, from_agent, agents_share",
    [
        ("agent.note/sess-a", True, True),  # published by an agent itself
        ("task.progress/sess-a", False, True),  # a worker's output, passed on by the scheduler
        ("egress.proxied/sess-a", False, True),  # each call an agent makes through the proxy
        ("egress.refused/sess-a", False, True),
        ("egress.refusals_suppressed/sess-a", False, True),
        ("task.succeeded/sess-a", False, False),  # the host's own record of the task
        ("session.closed/sess-a", False, False),
        ("container.died", False, False),
    ],
)
def test_events_an_agent_sets_the_number_of_are_kept_in_the_agents_share(topic, from_agent, agents_share):
    assert kept_as_agents(topic, from_agent) is agents_share
