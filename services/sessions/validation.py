"""Checks on what callers send, each failure an INVALID_ARGUMENT naming the field and the rule.

The bus decoder has already checked types, enums, roles, ids (schemas/ids.py), page limits and cursors;
these are the rules a type cannot say.
"""

from __future__ import annotations

import math
import unicodedata

import msgspec

from baaaht.bus.errors import invalid
from baaaht.schemas.sessions import MessageMetadata, SessionSettings

MAX_OWNER = 128
MAX_NAME = 256
MAX_DESCRIPTION = 4096
MAX_LABELS = 64
MAX_LABEL_KEY = 128
MAX_LABEL_VALUE = 512
MAX_TAGS = 64
MAX_TAG = 128
MAX_IMAGE = 512
ALLOWED_IN_PROSE = frozenset("\n\t")

_encode_metadata = msgspec.json.Encoder().encode


def text(field: str, value: str, limit: int, *, required: bool = False, prose: bool = False) -> str:
    if required and not value.strip():
        raise invalid(f"{field} is required", field=field)
    if len(value) > limit:
        raise invalid(
            f"{field} is {len(value)} characters long, at most {limit} allowed", field=field, limit=limit
        )
    allowed = ALLOWED_IN_PROSE if prose else frozenset()
    if any(unicodedata.category(char) == "Cc" and char not in allowed for char in value):
        raise invalid(f"{field} contains control characters", field=field)
    return value


def labels(value: dict[str, str]) -> dict[str, str]:
    if len(value) > MAX_LABELS:
        raise invalid(f"{len(value)} labels given, at most {MAX_LABELS} allowed", field="labels")
    for key, label in value.items():
        text("label key", key, MAX_LABEL_KEY, required=True)
        text(f"label {key!r}", label, MAX_LABEL_VALUE)
    return value


def tags(value: list[str]) -> list[str]:
    if len(value) > MAX_TAGS:
        raise invalid(f"{len(value)} tags given, at most {MAX_TAGS} allowed", field="tags")
    for tag in value:
        text("tag", tag, MAX_TAG, required=True)
    return value


def settings(value: SessionSettings, host_max_containers: int) -> SessionSettings:
    if not 0 <= value.max_containers <= host_max_containers:
        raise invalid(
            f"settings.max_containers is {value.max_containers}: it must be between 0 (the host default)"
            f" and the host limit policy.max_containers={host_max_containers}",
            field="settings.max_containers",
        )
    for field in ("max_duration", "idle_timeout"):
        seconds = getattr(value, field)
        if not (math.isfinite(seconds) and seconds >= 0):
            raise invalid(f"settings.{field} is {seconds}: it must be a number of seconds >= 0", field=field)
    for image in value.allowed_images:
        text("settings.allowed_images entry", image, MAX_IMAGE, required=True)
    return value


def message_size(content: str, metadata: MessageMetadata, limit: int) -> int:
    """Size of what is stored for a message, refused above session.max_message_size."""
    size = len(content.encode()) + len(_encode_metadata(metadata))
    if size > limit:
        raise invalid(
            f"message is {size} bytes (content and metadata), more than session.max_message_size={limit}",
            field="content",
            size=size,
            limit=limit,
        )
    return size
