"""Session volumes (pure rules): their engine names, and which volume mounts of a spec a session may have.

The orchestrator makes a session's volumes (`container.volume_create`), labelled with the installation
and the session, and removes them when the session is deleted. A session mounts its own volumes without
the policy judging them (the orchestrator made them for it, like the bus mount); another session's
volume, or any other volume of this installation, is refused; every other named volume is the policy's
to judge (`mounts.allowed_volumes`, empty by default).
"""

from __future__ import annotations

import re
from typing import Callable

import msgspec

from baaaht.bus.errors import BusError, invalid
from baaaht.schemas.containers import ContainerSpec, Mount, VolumeInfo
from baaaht.schemas.errors import ErrorCode
from baaaht.services.containers.ownership import OwnerKind, owner_labels, owner_of

NAME = re.compile(r"^[a-z][a-z0-9]{0,31}$")
LABEL_VOLUME = "baaaht.volume"
INSTALL_PART = 12


def volume_name(install_id: str, session_id: str, name: str) -> str:
    """`baaaht-<install>-<session>-<name>`: unique per installation and session (the name has no '-', so
    no two sessions' names can meet)."""
    if not NAME.match(name):
        raise invalid(
            f"name must be 1-32 lower-case letters and digits, starting with a letter (got {name!r})",
            field="name",
        )
    return f"{names_prefix(install_id)}{session_id}-{name}"


def names_prefix(install_id: str) -> str:
    """What every session volume's name of this installation starts with."""
    return f"baaaht-{install_id[:INSTALL_PART]}-"


def volume_labels(install_id: str, session_id: str, name: str) -> dict[str, str]:
    return {**owner_labels(install_id, OwnerKind.SESSION, session_id), LABEL_VOLUME: name}


def is_session_volume(volume: VolumeInfo, install_id: str, session_id: str) -> bool:
    owner = owner_of(volume.labels, install_id)
    return owner.follows_session and owner.session_id == session_id


def split_own_volumes(
    spec: ContainerSpec, install_id: str, session_id: str, lookup: Callable[[str], VolumeInfo | None]
) -> tuple[ContainerSpec, list[Mount]]:
    """(the spec without the session's own volume mounts, those mounts). `lookup` answers a volume by
    name, None when there is none. Raises PERMISSION_DENIED for a volume of this installation, or a
    name of its session volumes, that is not the session's: a policy allowing other volumes must not let
    a session take another's name before the volume is made (the engine would make it, unlabelled)."""
    rest, own = [], []
    for index, mount in enumerate(spec.mounts):
        if mount.type != "volume" or not mount.source:
            rest.append(mount)
            continue
        volume = lookup(mount.source)
        if volume is not None and is_session_volume(volume, install_id, session_id):
            own.append(mount)
        elif mount.source.startswith(names_prefix(install_id)) or (
            volume is not None and owner_of(volume.labels, install_id).ours
        ):
            raise BusError(
                ErrorCode.PERMISSION_DENIED,
                f"spec.mounts[{index}]: volume {mount.source!r} is not one made for session {session_id} "
                "(it is another session's, the host's, or a name kept for session volumes); a session "
                "mounts only its own volumes, made by container.volume_create",
                {"field": f"spec.mounts[{index}].source", "rules": ["mount.volume.not_owned"]},
            )
        else:
            rest.append(mount)
    return msgspec.structs.replace(spec, mounts=rest), own


def with_own_volumes(judged: ContainerSpec, enforced: ContainerSpec, own: list[Mount]) -> ContainerSpec:
    """The policy's enforced spec plus the session's own volumes. The policy judged `judged` (without
    them) and appended its defaults after the mounts it was given; a default mounted where an own volume
    goes (the tmpfs /tmp of a read-only root) gives way to the volume the request asked for."""
    given = enforced.mounts[: len(judged.mounts)]
    own_targets = {mount.target.rstrip("/") for mount in own}
    defaults = [m for m in enforced.mounts[len(judged.mounts) :] if m.target.rstrip("/") not in own_targets]
    return msgspec.structs.replace(enforced, mounts=[*given, *defaults, *own])
