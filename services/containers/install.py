"""The installation id: one per host installation, kept under data_dir, carried by every container's
`baaaht.install` label so that reconcile never touches another installation's containers."""

from __future__ import annotations

import os
import re
import secrets
import tempfile

FILE_NAME = "install-id"
VALID = re.compile(r"^[0-9a-f]{32}$")


class InstallIdError(RuntimeError):
    pass


def load_or_create(data_dir: str) -> str:
    """The persisted id, made on first use. Two processes racing both end up with the same id."""
    path = os.path.join(data_dir, FILE_NAME)
    if not os.path.exists(path):
        os.makedirs(data_dir, mode=0o750, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=".install-id.", dir=data_dir)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(16) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.link(temp, path)  # fails if another process got there first: its id wins
        except FileExistsError:
            pass
        finally:
            os.unlink(temp)
    with open(path) as f:
        install_id = f.read().strip()
    if not VALID.match(install_id):
        # Never replaced silently: a new id would disown every container made under the old one.
        raise InstallIdError(f"{path} does not hold an installation id (32 hex digits); fix or remove it")
    return install_id
