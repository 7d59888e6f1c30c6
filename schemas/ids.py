"""What a valid id or name is, once for every service: the bus decoder refuses anything else with
INVALID_ARGUMENT and `details.path` naming the field, before a handler runs.

Ids and names go into engine API URL paths, volume names and labels, so none may hold a '/', a space
or a control character, or be '.' or '..'; the first character is a letter or a digit so that no id
reads as a command-line option.
"""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
MAX_ID = 128
ID_RULE = f"1-{MAX_ID} letters, digits, '_', '.' or '-', starting with a letter or a digit"


def _id(what: str) -> Meta:
    return Meta(min_length=1, max_length=MAX_ID, pattern=ID_PATTERN, description=f"{what}: {ID_RULE}.")


def _optional_id(what: str) -> Meta:
    """Empty means none given (no filter, or the orchestrator picks)."""
    return Meta(max_length=MAX_ID, pattern=f"^(?:{ID_PATTERN[1:-1]})?$", description=f"{what}: {ID_RULE}.")


SessionId = Annotated[str, _id("A session id")]
ContainerId = Annotated[str, _id("A container's full id")]
ContainerIdOrName = Annotated[str, _id("A container: its id, an id prefix or its name")]
SessionFilter = Annotated[str, _optional_id("Empty (every session) or a session id")]
ContainerName = Annotated[str, _optional_id("Empty (the orchestrator picks one) or a container name")]
Role = Annotated[
    str,
    Meta(
        pattern=r"^[a-z][a-z0-9_-]{0,31}$",
        description="A container's role: 1-32 lower-case letters, digits, '_' or '-', first a letter.",
    ),
]
VolumeShortName = Annotated[
    str,
    Meta(
        pattern=r"^[a-z][a-z0-9]{0,31}$",
        description="A session volume's name: 1-32 lower-case letters and digits, starting with a letter.",
    ),
]
Image = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=512,
        # It goes into the engine API's URL path: a '.' or '..' part would reach another endpoint.
        pattern=r"^(?!(?:.*/)?\.\.?(?:/|$))\S+$",
        description="An image reference: no whitespace and no '.' or '..' path part.",
    ),
]
