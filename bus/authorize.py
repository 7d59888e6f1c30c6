"""Who may do what on the bus: one rule table behind pure functions.

The broker asks `authorize(role, action, target)` for every message that acts on
someone else (a call, a reply, an event, a registration, an event delivered to an
agent) and refuses what it denies with PERMISSION_DENIED. A role's rules for an
action are an ordered list of (pattern, allowed): the first pattern that matches the
target decides, and no match, an unknown role or an unknown action is a denial
(default deny).

A pattern is an exact target, a prefix ending in `*` (`bus.*`), or `*`. Targets are
`service.method` for calls and answers, the service name for registrations and, for
events, the topic's tag part: `session.message` of `session.message/<session id>`
(schemas/base.py topic_for). Where an event may go by session is decided here too:
`publish_topic` (what an agent's event is published as) and `may_receive` (which
events an agent connection is sent).

New services add their rows here, nowhere else: their methods under the roles that
may call them, their topics in DOMAINS.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

from baaaht.schemas.base import SESSION_SEPARATOR, split_topic

# Roles. On the services socket a peer of the host's uid is `operator`, and `service` once it has
# registered; on the agent socket the role is the one its container's identity names (the container
# manager writes it: common/identity.py), `unidentified` without one.
SERVICE = "service"  # a registered service instance on the services socket
OPERATOR = "operator"  # any other peer on the services socket: baaaht-ctl, host processes
AGENT = "agent"  # a plain agent container, scoped to its session
ASSISTANT = "assistant"  # the session's assistant (issue 14)
WORKER = "worker"  # a worker taking its session's tasks (issues 12, 13)
UNIDENTIFIED = "unidentified"  # on the agent socket with no identity (yet, or any more)
REFUSED = "refused"  # on the services socket with a uid that is neither the host's nor root's
AGENT_ROLES = frozenset({AGENT, ASSISTANT, WORKER})  # the roles an identity file may grant

# Actions
CALL = "call"  # send a REQUEST to `target` (a service method or a bus.* built-in)
ANSWER = "answer"  # send a REPLY or PARTIAL to a request for `target`
PUBLISH = "publish"  # send an EVENT on a topic whose tag is `target`
REGISTER = "register"  # offer the methods of service `target`
RECEIVE = "receive"  # be sent, on the agent connection, an event of its session whose tag is `target`
ACTIONS = (CALL, ANSWER, PUBLISH, REGISTER, RECEIVE)

ALLOW, DENY = True, False
Rules = tuple[tuple[str, bool], ...]

EVERYTHING: Rules = (("*", ALLOW),)
OWN_DOMAIN = "(own domain)"  # shown for the service role's publish rules: they depend on its name

# A registered service publishes only the topics of its domain: its own name's, and those listed here.
DOMAINS: dict[str, tuple[str, ...]] = {
    "container": ("container.*", "image.*"),
    "session": ("session.*",),
    "policy": ("policy.*",),
    "credential": ("credential.*", "egress.*"),
    "task": ("task.*", "schedule.*"),
}

# Event tags whose bodies an agent wrote, or whose number it sets, though a service publishes them (a
# worker's task output, which the scheduler passes on as it comes; the egress proxy's record of each
# call an agent makes, refused or proxied: a cheap upstream call in a loop is one event each, and the
# session budgets are off by default): kept in the agents' share of the event history, so that no agent
# can evict the host's history through a service (bus/registry.py EventLog).
AGENT_WRITTEN: frozenset[str] = frozenset(
    {"task.progress", "egress.proxied", "egress.refused", "egress.refusals_suppressed"}
)

# What every agent role may call: its own session's conversation (the session service checks the
# session against the stamped Caller) and the broker's ping and replay (filtered to what it may receive).
_SESSION_CALLS: Rules = (
    ("bus.ping", ALLOW),
    ("bus.events.replay", ALLOW),
    ("session.get", ALLOW),
    ("session.messages", ALLOW),
    ("session.send_message", ALLOW),
    ("session.cancel", ALLOW),
)
_AGENT_EVENTS: Rules = (("agent.*", ALLOW),)

# role -> action -> first-match rules. What is not listed is denied.
RULES: dict[str, dict[str, Rules]] = {
    # Only the operator issues and revokes the keys of peers on other hosts: a service key must not
    # mint itself an operator key.
    SERVICE: {
        CALL: (("bus.auth.keys.*", DENY), ("*", ALLOW)),
        ANSWER: EVERYTHING,
        PUBLISH: ((OWN_DOMAIN, ALLOW),),
        REGISTER: EVERYTHING,
    },
    OPERATOR: {
        # bus.agents.update says an identity changed: only the container manager (a service) knows.
        CALL: (("bus.agents.update", DENY), ("*", ALLOW)),
        REGISTER: EVERYTHING,
    },
    AGENT: {
        CALL: _SESSION_CALLS,
        PUBLISH: _AGENT_EVENTS,
        RECEIVE: (("session.*", ALLOW), ("agent.*", ALLOW)),
    },
    ASSISTANT: {
        CALL: (
            *_SESSION_CALLS,
            ("task.submit", ALLOW),
            ("task.get", ALLOW),
            ("task.wait", ALLOW),
            ("task.cancel", ALLOW),
        ),
        # Its answer as it is generated, to its own session (publish_topic keeps it there).
        PUBLISH: (*_AGENT_EVENTS, ("session.partial", ALLOW)),
        RECEIVE: (("session.*", ALLOW), ("agent.*", ALLOW), ("task.*", ALLOW)),
    },
    WORKER: {
        CALL: (
            ("bus.ping", ALLOW),
            ("bus.events.replay", ALLOW),
            ("task.work", ALLOW),
            ("task.ack", ALLOW),
            ("task.heartbeat", ALLOW),
            ("task.progress", ALLOW),
            ("task.complete", ALLOW),
        ),
        PUBLISH: _AGENT_EVENTS,
        RECEIVE: (("session.closed", ALLOW), ("task.*", ALLOW)),
    },
    UNIDENTIFIED: {CALL: (("bus.ping", ALLOW),)},
    REFUSED: {},
}


class Denial(NamedTuple):
    """Why a message is refused (always answered PERMISSION_DENIED)."""

    message: str


def _matches(pattern: str, target: str) -> bool:
    if pattern.endswith("*"):
        return target.startswith(pattern[:-1])
    return target == pattern


def _allowed(rules: Rules) -> str:
    patterns = [p for p, allowed in rules if allowed]
    return ", ".join(patterns) if patterns else "nothing"


def domain_rules(service: str) -> Rules:
    """What a registered service may publish: its own name's topics and its DOMAINS entry."""
    return tuple((pattern, ALLOW) for pattern in dict.fromkeys((f"{service}.*", *DOMAINS.get(service, ()))))


@functools.lru_cache(maxsize=4096)  # hot path: every message; bounded, since targets come from peers
def authorize(role: str, action: str, target: str, service: str = "") -> Denial | None:
    """None when `role` may do `action` on `target`, else the Denial saying why not. `service` is a
    registered service's name: its publish rules are its domain's."""
    rules = RULES.get(role, {}).get(action, ())
    if role == SERVICE and action == PUBLISH:
        rules = domain_rules(service)
    for pattern, allowed in rules:
        if _matches(pattern, target):
            if allowed:
                return None
            break
    who = f"service {service!r}" if role == SERVICE and service else f"{role} peers"
    return Denial(f"{who} may not {action} {target!r} (allowed: {_allowed(rules)})")


def publish_topic(role: str, session: str, topic: str, service: str = "") -> tuple[str, Denial | None]:
    """The topic an event sent on `topic` is published as, or the Denial. Host peers publish on the
    topic they name; an agent's event is always its own session's: `<tag>` becomes `<tag>/<session>`,
    and another session's topic is refused."""
    tag, topic_session = split_topic(topic)
    denial = authorize(role, PUBLISH, tag, service)
    if denial is not None or role not in AGENT_ROLES:
        return topic, denial
    if topic_session and topic_session != session:
        return topic, Denial(f"{role} peers publish only in their own session, not {topic_session!r}")
    return f"{tag}{SESSION_SEPARATOR}{session}", None


def kept_as_agents(topic: str, from_agent: bool) -> bool:
    """Whether an event published on `topic` is kept in the agents' share of the event history."""
    return from_agent or split_topic(topic)[0] in AGENT_WRITTEN


def may_receive(role: str, session: str, topic: str) -> bool:
    """Whether an agent of `role` in `session` is sent the event on `topic` (delivery, replay):
    only its own session's events, of tags its role may receive; never a host-wide event."""
    tag, topic_session = split_topic(topic)
    return bool(session) and topic_session == session and authorize(role, RECEIVE, tag) is None


def rules_table() -> list[tuple[str, str, list[tuple[str, bool]]]]:
    """(role, action, rules) of every role and action, as `bus.auth.rules` serves it."""
    return [(role, action, list(RULES[role].get(action, ()))) for role in RULES for action in ACTIONS]
