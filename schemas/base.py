"""Base classes for every bus message, one per message role.

Evolution rule (see docs/PROTOCOL.md): tags are permanent, fields are only ever
added and only with defaults, and nothing is renamed or removed. Decoders never
forbid unknown fields, so an older peer ignores what a newer one adds.
"""

from __future__ import annotations

from typing import Any, ClassVar

import msgspec

SCHEMA_VERSION = 1


class Request(msgspec.Struct, kw_only=True, tag_field="type", omit_defaults=True):
    """An RPC request. Its tag is the bus target, `service.method`."""

    response: ClassVar[type] = type(None)


class Response(msgspec.Struct, kw_only=True, omit_defaults=True):
    """An RPC result (or one partial result of a streaming call)."""


class Event(msgspec.Struct, kw_only=True, tag_field="type", omit_defaults=True):
    """A published event. Its tag is the topic it is published under."""


class Empty(Response, kw_only=True):
    """A result with nothing in it."""


def target_of(request_type: type[Request]) -> str:
    return request_type.__struct_config__.tag


def topic_of(event_type: type[Event]) -> str:
    return event_type.__struct_config__.tag


SESSION_SEPARATOR = "/"  # tags never hold one: what follows it in a topic is the session id


def topic_for(event: Event, subtopic: str = "") -> str:
    """The topic `event` is published on: its tag (and `.subtopic`), then `/<session id>` when the
    event has a non-empty `session_id` field. Subscribers match prefixes: `<tag>` still gets every
    session's events; the broker delivers an agent only its own session's."""
    topic = topic_of(type(event)) + (f".{subtopic}" if subtopic else "")
    session = getattr(event, "session_id", "")
    return f"{topic}{SESSION_SEPARATOR}{session}" if isinstance(session, str) and session else topic


def session_topic(event_type: type[Event], session_id: str) -> str:
    """The topic of `event_type`'s events about one session."""
    return f"{topic_of(event_type)}{SESSION_SEPARATOR}{session_id}"


def split_topic(topic: str) -> tuple[str, str]:
    """(tag part, session id) of a topic; the session is "" for a host-wide event."""
    tag, _, session = topic.partition(SESSION_SEPARATOR)
    return tag, session


def all_subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(all_subclasses(sub))
    return found


def known_types() -> dict[str, type[msgspec.Struct]]:
    """Every schema type by name and by tag, for `baaaht-ctl schema` and `call`."""
    from baaaht import schemas  # noqa: F401 - import every domain module

    schemas.load_all()
    found: dict[str, Any] = {}
    for base in (Request, Response, Event):
        for cls in all_subclasses(base):
            found[cls.__name__] = cls
            tag = cls.__struct_config__.tag
            if isinstance(tag, str):
                # A request and the event it causes may share a tag (`session.cancel`): the request keeps it.
                found.setdefault(tag, cls)
    return found
