"""The host's mount table as /proc/self/mountinfo tells it, and taking down what is mounted beneath a
directory (a test's or benchmark's private run and data directories, before they are deleted)."""

from __future__ import annotations

import subprocess

MOUNTINFO = "/proc/self/mountinfo"


def mount_points(mountinfo: str = MOUNTINFO) -> list[tuple[str, str]]:
    """(mount point, optional fields such as `shared:12`) of every mount, in the order they were made."""
    found = []
    with open(mountinfo) as f:
        for line in f:
            fields = line.split()
            separator = fields.index("-")
            point = fields[4].encode().decode("unicode_escape")  # \\040 for a space, etc.
            found.append((point, " ".join(fields[6:separator])))
    return found


def unmount_beneath(directory: str, mountinfo: str = MOUNTINFO) -> None:
    """Lazily unmount everything mounted at or beneath `directory`, the deepest first; a mount that will
    not go is left (nothing is raised: this is cleanup)."""
    prefix = directory.rstrip("/") + "/"
    points = {point for point, _ in mount_points(mountinfo) if point == directory or point.startswith(prefix)}
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "--lazy", point], capture_output=True, timeout=30)
