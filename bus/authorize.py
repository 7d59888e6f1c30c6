"""Who may do what on the bus: one rule table behind one pure function.

The broker asks `authorize(role, action, target)` for every message that acts on
someone else (a call, a reply, an event, a registration) and refuses what it
denies with PERMISSION_DENIED. A role's rules for an action are an ordered list
of (pattern, allowed): the first pattern that matches the target decides, and
no match, an unknown role or an unknown action is a denial (default deny).

A pattern is an exact target, a prefix ending in `*` (`bus.*`), or `*`.
Targets are `service.method` for calls and answers, the topic for events and
the service name for registrations.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

# Roles. A peer's role comes from the socket it came through and, on the services
# socket, from whether it registered: the roles issue adds assistant, worker and
# per-session scope here.
SERVICE = "service"  # a registered service instance on the services socket
OPERATOR = "operator"  # anything else on the services socket: baaaht-ctl, host processes
AGENT = "agent"  # a peer on the agent socket (hostile by assumption)

# Actions
CALL = "call"  # send a REQUEST to `target` (a service method or a bus.* built-in)
ANSWER = "answer"  # send a REPLY or PARTIAL to a request for `target`
PUBLISH = "publish"  # send an EVENT on topic `target`
REGISTER = "register"  # offer the methods of service `target`

ALLOW, DENY = True, False
Rules = tuple[tuple[str, bool], ...]

EVERYTHING: Rules = (("*", ALLOW),)

# role -> action -> first-match rules. What is not listed is denied.
RULES: dict[str, dict[str, Rules]] = {
    # Only the operator issues and revokes the keys of peers on other hosts: a service key must not
    # mint itself an operator key.
    SERVICE: {
        CALL: (("bus.auth.keys.*", DENY), ("*", ALLOW)),
        ANSWER: EVERYTHING,
        PUBLISH: EVERYTHING,
        REGISTER: EVERYTHING,
    },
    OPERATOR: {CALL: EVERYTHING, ANSWER: EVERYTHING, PUBLISH: EVERYTHING, REGISTER: EVERYTHING},
    AGENT: {
        # The event history and the peer list would show agents everything on the host.
        # Until the roles issue scopes agents to their session, no method added since then is opened to
        # them: exec would run commands in any session's container, volume_* reach any session's volumes,
        # audit_* would show every principal's decisions and the host's paths.
        CALL: (
            ("bus.ping", ALLOW),
            ("bus.*", DENY),
            ("container.exec", DENY),
            ("container.volume_*", DENY),
            ("policy.audit_*", DENY),
            ("credential.*", DENY),  # secrets are the operator's: agents only reach them through the proxy
            ("*", ALLOW),
        ),
        PUBLISH: (("agent.*", ALLOW),),
    },
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


@functools.lru_cache(maxsize=4096)  # hot path: every message; bounded, since targets come from peers
def authorize(role: str, action: str, target: str) -> Denial | None:
    """None when `role` may do `action` on `target`, else the Denial saying why not."""
    rules = RULES.get(role, {}).get(action, ())
    for pattern, allowed in rules:
        if _matches(pattern, target):
            if allowed:
                return None
            break
    return Denial(f"{role} peers may not {action} {target!r} (allowed: {_allowed(rules)})")
