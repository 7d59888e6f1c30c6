"""A written fake of the workspace mounts adapter: an image is a marker file, a mount a recorded target."""

from __future__ import annotations

import os
import shutil
import threading

from baaaht.services.containers.workspaces import WorkspaceError

FAKE_FILESYSTEM = b"fake ext4 filesystem, size "


class FakeWorkspaceMounts:
    """Like LoopMounts, minus the kernel. A mounted image's files are its target directory's; unmounted,
    they are kept aside (so the mount point is empty again) until the image is mounted again. Nothing
    enforces the size."""

    def __init__(self, aside: str) -> None:
        self.mounted: dict[str, str] = {}  # target -> image
        self.made: list[str] = []
        self.checked: list[str] = []
        self.fail_mount: set[str] = set()  # images whose mount fails
        self.owners: dict[str, tuple[int, int]] = {}  # files-aside dir -> the root's owner
        self._aside = aside  # where unmounted images' files are kept
        os.makedirs(aside, exist_ok=True)
        self._lock = threading.Lock()

    def make_image(self, image: str, size: int, uid: int, gid: int) -> None:
        with open(image, "xb") as file:
            file.write(FAKE_FILESYSTEM + str(size).encode())
        shutil.rmtree(self._files_of(image), ignore_errors=True)
        os.makedirs(self._files_of(image))
        self.owners[self._files_of(image)] = (uid, gid)
        with self._lock:
            self.made.append(image)

    def check_image(self, image: str) -> None:
        with self._lock:
            self.checked.append(image)
        with open(image, "rb") as file:
            if not file.read().startswith(FAKE_FILESYSTEM):
                raise WorkspaceError(f"the workspace image {image} is damaged", image)

    def mount(self, image: str, target: str) -> None:
        if image in self.fail_mount:
            raise WorkspaceError(f"could not mount the workspace image {image} at {target}", image)
        with self._lock:
            if target in self.mounted:
                raise WorkspaceError(f"{target} is mounted already", target)
            self.mounted[target] = image
        _move_entries(self._files_of(image), target)
        os.chmod(target, 0o755)
        os.chown(target, *self.owners[self._files_of(image)])

    def unmount(self, target: str) -> None:
        with self._lock:
            image = self.mounted.pop(target, None)
        if image is None:
            raise WorkspaceError(f"{target} is not mounted", target)
        _move_entries(target, self._files_of(image))

    def is_mounted(self, target: str) -> bool:
        with self._lock:
            return target in self.mounted

    def forget_mounts(self) -> None:
        """A host restart: every mount is gone, the images stay."""
        with self._lock:
            gone = dict(self.mounted)
            self.mounted.clear()
        for target, image in gone.items():
            _move_entries(target, self._files_of(image))

    def _files_of(self, image: str) -> str:
        """Where an unmounted image's files are kept: by inode, which a rename of the image keeps."""
        return os.path.join(self._aside, str(os.stat(image).st_ino))


def _move_entries(source: str, destination: str) -> None:
    for name in os.listdir(source):
        os.rename(os.path.join(source, name), os.path.join(destination, name))
