"""Each session's workspace: a size-limited ext4 filesystem in a sparse image file, loop-mounted on the host.

The image `<data_dir>/workspace-images/<session>.img` holds the files; it is mounted (nodev, nosuid) at
`<data_dir>/workspaces/<session>/`, whose root belongs to the agent user (uid/gid 1000), and that host
directory is what a session's worker containers mount at /workspace. A full workspace is the filesystem's
ENOSPC, not the host disk's. The images outlive a host restart (the mounts do not): the container manager
mounts every image again when it starts. Images and mount points sit in separate directories so no session
id can name another's file (a session `a.img` beside the image of session `a`).

An image that cannot be checked or mounted is an error naming its file, never replaced by a new empty
workspace: nothing stored is lost. The loop/mkfs/mount commands are an adapter (`LoopMounts` here, a fake
in unit tests).
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

from baaaht.schemas.ids import ID_PATTERN, MAX_ID
from baaaht.services.containers.ownership import OwnerKind, owner_labels

log = logging.getLogger("baaaht.containers.workspaces")

AGENT_UID = 1000
AGENT_GID = 1000
IMAGE_SUFFIX = ".img"
MOUNT_OPTIONS = "nodev,nosuid"
COMMAND_TIMEOUT = 120.0  # mkfs, e2fsck, mount or umount of one image
_SESSION_ID = re.compile(ID_PATTERN)
PARTIAL_SUFFIX = ".new"


class WorkspaceError(Exception):
    """A workspace that cannot be made, mounted or removed; the message names the file."""

    def __init__(self, message: str, path: str) -> None:
        super().__init__(message)
        self.message = message
        self.path = path


class WorkspaceMounts(Protocol):
    """The outside world of workspaces: making, checking, mounting and unmounting filesystem images."""

    def make_image(self, image: str, size: int, uid: int, gid: int) -> None:
        """A new sparse image of `size` bytes holding an empty filesystem whose root is uid:gid."""

    def check_image(self, image: str) -> None:
        """Raise WorkspaceError when the image's filesystem is damaged beyond an automatic repair."""

    def mount(self, image: str, target: str) -> None: ...

    def unmount(self, target: str) -> None: ...

    def is_mounted(self, target: str) -> bool: ...


def _run(argv: list[str], what: str, path: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False)
    except FileNotFoundError:
        raise WorkspaceError(f"{what} {path}: {argv[0]} is not installed", path) from None
    except subprocess.TimeoutExpired:
        raise WorkspaceError(
            f"{what} {path}: {argv[0]} did not finish in {COMMAND_TIMEOUT:g}s", path
        ) from None


def _failed(result: subprocess.CompletedProcess) -> str:
    return (result.stderr or result.stdout).strip() or f"exit status {result.returncode}"


class LoopMounts:
    """The real thing: mkfs.ext4 into a sparse file, e2fsck, and loop mounts (root, /dev/loop-control)."""

    def make_image(self, image: str, size: int, uid: int, gid: int) -> None:
        with open(image, "xb") as file:
            file.truncate(size)
        result = _run(
            [
                "mkfs.ext4",
                "-q",
                "-F",
                "-m",
                "0",
                "-E",
                f"root_owner={uid}:{gid},lazy_itable_init=1,lazy_journal_init=1",
                image,
            ],
            "could not make the workspace image",
            image,
        )
        if result.returncode != 0:
            raise WorkspaceError(f"could not make the workspace image {image}: {_failed(result)}", image)

    def check_image(self, image: str) -> None:
        # A second loop device on an image in use would be a second filesystem writing the same blocks,
        # and e2fsck of a filesystem in use could damage it: an image still attached is refused.
        attached = _run(["losetup", "-j", image], "could not check the workspace image", image)
        if attached.returncode != 0 or attached.stdout.strip():
            in_use = attached.stdout.strip().split(":", 1)[0] or _failed(attached)
            raise WorkspaceError(
                f"the workspace image {image} is in use ({in_use}) but not mounted at its workspace; "
                "unmount or detach it first",
                image,
            )
        # -p repairs what is safe to repair unattended; 4 and above: errors left, or e2fsck failed.
        result = _run(["e2fsck", "-p", image], "could not check the workspace image", image)
        if result.returncode >= 4:
            raise WorkspaceError(
                f"the workspace image {image} is damaged (e2fsck exit status {result.returncode}: "
                f"{_failed(result)}); it was not mounted and nothing was removed",
                image,
            )

    def mount(self, image: str, target: str) -> None:
        result = _run(
            ["mount", "-t", "ext4", "-o", f"loop,{MOUNT_OPTIONS}", image, target],
            "could not mount the workspace image",
            image,
        )
        if result.returncode != 0:
            raise WorkspaceError(
                f"could not mount the workspace image {image} at {target}: {_failed(result)}", image
            )

    def unmount(self, target: str) -> None:
        # The loop device of a `mount -o loop` is freed with its last mount (autoclear).
        result = _run(["umount", target], "could not unmount the workspace", target)
        if result.returncode != 0 and self.is_mounted(target):
            raise WorkspaceError(f"could not unmount the workspace {target}: {_failed(result)}", target)

    def is_mounted(self, target: str) -> bool:
        return os.path.ismount(target)


@dataclass(frozen=True)
class WorkspaceImage:
    """A workspace image as reconcile sees it: owned by its session, made at `created`."""

    session_id: str
    created: float
    labels: dict[str, str] = field(default_factory=dict)


class Workspaces:
    """The sessions' workspaces on this host; every method is thread-safe and idempotent."""

    def __init__(
        self,
        data_dir: str,
        size: int,
        mounts: WorkspaceMounts,
        *,
        uid: int = AGENT_UID,
        gid: int = AGENT_GID,
    ) -> None:
        self.images_dir = os.path.join(data_dir, "workspace-images")
        self.mounts_dir = os.path.join(data_dir, "workspaces")
        self.size = size
        self.mounts = mounts
        self.uid, self.gid = uid, gid
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()
        self._making = threading.Lock()  # one new image at a time: the room for it is judged alone

    def image_of(self, session_id: str) -> str:
        return os.path.join(self.images_dir, _checked(session_id) + IMAGE_SUFFIX)

    def target_of(self, session_id: str) -> str:
        return os.path.join(self.mounts_dir, _checked(session_id))

    def ensure(self, session_id: str) -> str:
        """The host path of the session's mounted workspace, made and mounted when it is not."""
        image, target = self.image_of(session_id), self.target_of(session_id)
        with self._lock(session_id):
            if self.mounts.is_mounted(target):
                return target
            os.makedirs(self.images_dir, mode=0o700, exist_ok=True)
            os.makedirs(self.mounts_dir, mode=0o755, exist_ok=True)
            made = False
            if not os.path.exists(image):
                self._make(image)
                made = True
            else:
                self.mounts.check_image(image)
            # Unmounted, the directory is root's and closed: nothing writes beside the size limit.
            try:
                os.mkdir(target, 0o000)
            except FileExistsError:
                os.chmod(target, 0o000)
            self.mounts.mount(image, target)
            if made:
                _remove_lost_and_found(target)
            log.info("workspace mounted", extra={"session": session_id, "path": target})
            return target

    def existing(self, session_id: str) -> str | None:
        """The host path of the session's workspace, mounted if it was not; None when it has none."""
        if not os.path.exists(self.image_of(session_id)):
            return None
        return self.ensure(session_id)

    def path(self, session_id: str) -> str | None:
        """The host path of the session's workspace while it is mounted, else None."""
        target = self.target_of(session_id)
        return target if self.mounts.is_mounted(target) else None

    def remove(self, session_id: str) -> None:
        """Unmount the session's workspace and delete it with its files."""
        image, target = self.image_of(session_id), self.target_of(session_id)
        with self._lock(session_id):
            if self.mounts.is_mounted(target):
                self.mounts.unmount(target)
            try:
                os.rmdir(target)  # empty once unmounted; never a recursive delete of a mounted tree
            except FileNotFoundError:
                pass
            except OSError as error:
                raise WorkspaceError(
                    f"could not remove the workspace mount point {target}: {error.strerror}", target
                ) from None
            try:
                os.unlink(image)
            except FileNotFoundError:
                pass
            log.info("workspace removed", extra={"session": session_id, "path": image})

    def sessions(self) -> list[str]:
        """The sessions that have a workspace image, sorted."""
        try:
            names = os.listdir(self.images_dir)
        except FileNotFoundError:
            return []
        return sorted(
            name[: -len(IMAGE_SUFFIX)]
            for name in names
            if name.endswith(IMAGE_SUFFIX) and _SESSION_ID.match(name[: -len(IMAGE_SUFFIX)])
        )

    def images(self, install_id: str) -> list[WorkspaceImage]:
        """Every workspace image, labelled as its session's (what reconcile judges)."""
        found = []
        for session_id in self.sessions():
            try:
                created = os.stat(self.image_of(session_id)).st_mtime
            except FileNotFoundError:
                continue  # removed meanwhile
            labels = owner_labels(install_id, OwnerKind.SESSION, session_id)
            found.append(WorkspaceImage(session_id, created, labels))
        return found

    def mount_existing(self) -> list[WorkspaceError]:
        """Mount every image that is not mounted (after a host restart); the ones that fail, each
        logged, stay as they are. Images a crash left half-made are deleted first (none is being made
        before the service starts)."""
        try:
            leftovers = [name for name in os.listdir(self.images_dir) if name.endswith(PARTIAL_SUFFIX)]
        except FileNotFoundError:
            leftovers = []
        for name in leftovers:
            os.unlink(os.path.join(self.images_dir, name))
        failures = []
        for session_id in self.sessions():
            try:
                self.ensure(session_id)
            except WorkspaceError as error:
                log.error("workspace not mounted: %s", error.message, extra={"session": session_id})
                failures.append(error)
        return failures

    def _make(self, image: str) -> None:
        """A new image, made under a temporary name: a crash mid-mkfs leaves no half-made image."""
        partial = f"{image}.{os.getpid()}.{time.monotonic_ns()}{PARTIAL_SUFFIX}"
        with self._making:
            self._require_room(image)
            try:
                self.mounts.make_image(partial, self.size, self.uid, self.gid)
                os.rename(partial, image)
            except BaseException:
                try:
                    os.unlink(partial)
                except FileNotFoundError:
                    pass
                raise

    def _require_room(self, image: str) -> None:
        """Images are sparse: each takes host space only as its agent writes. A new one is made only while
        the filesystem holding them has room for every image to fill up, the new one too; else one
        session filling its workspace would leave the others' loop devices failing writes (I/O errors,
        data lost) although their own filesystems show space free."""
        promised = self.size
        for name in os.listdir(self.images_dir):
            try:
                info = os.stat(os.path.join(self.images_dir, name))
            except FileNotFoundError:
                continue
            promised += max(0, info.st_size - info.st_blocks * 512)
        disk = os.statvfs(self.images_dir)
        free = disk.f_bavail * disk.f_frsize
        if promised > free:
            raise WorkspaceError(
                f"no room for the workspace image {image}: the workspaces' images may still grow by "
                f"{promised} bytes (workspace.size {self.size} each, this one included) but "
                f"{self.images_dir} has {free} bytes free; free space or lower workspace.size",
                image,
            )

    def _lock(self, session_id: str) -> threading.Lock:
        with self._locks_lock:
            return self._locks.setdefault(session_id, threading.Lock())


def _checked(session_id: str) -> str:
    if not _SESSION_ID.match(session_id) or len(session_id) > MAX_ID:
        raise ValueError(f"not a session id: {session_id!r}")
    return session_id


def _remove_lost_and_found(target: str) -> None:
    """A new workspace starts empty (e2fsck makes lost+found again if it ever needs one)."""
    try:
        os.rmdir(os.path.join(target, "lost+found"))
    except FileNotFoundError:
        pass
