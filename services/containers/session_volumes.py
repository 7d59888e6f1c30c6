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
    return f"baaaht-{install_id[:INSTALL_PART]}-{session_id}-{name}"


def volume_labels(install_id: str, session_id: str, name: str) -> dict[str, str]:
    return {**owner_labels(install_id, OwnerKind.SESSION, session_id), LABEL_VOLUME: name}


def is_session_volume(volume: VolumeInfo, install_id: str, session_id: str) -> bool:
    owner = owner_of(volume.labels, install_id)
    return owner.follows_session and owner.session_id == session_id


def split_own_volumes(
    spec: ContainerSpec, install_id: str, session_id: str, lookup: Callable[[str], VolumeInfo | None]
) -> tuple[ContainerSpec, list[Mount]]:
    """(the spec without the session's own volume mounts, those mounts). `lookup` answers a volume by
    name, None when there is none. Raises PERMISSION_DENIED for a volume of this installation that is
    not the session's."""
    rest, own = [], []
    for index, mount in enumerate(spec.mounts):
        volume = lookup(mount.source) if mount.type == "volume" and mount.source else None
        if volume is None or not owner_of(volume.labels, install_id).ours:
            rest.append(mount)
        elif is_session_volume(volume, install_id, session_id):
            own.append(mount)
        else:
            raise BusError(
                ErrorCode.PERMISSION_DENIED,
                f"spec.mounts[{index}]: volume {mount.source!r} belongs to another session or to the "
                f"host; session {session_id} may mount only its own volumes",
                {"field": f"spec.mounts[{index}].source", "rules": ["mount.volume.not_owned"]},
            )
    return msgspec.structs.replace(spec, mounts=rest), own
