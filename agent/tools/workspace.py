"""Opening paths beneath a workspace root, never outside it, with no check-then-use race.

Every open starts from a file descriptor of the root, so a path is resolved by the kernel at the
moment of use. Where the kernel has openat2, it resolves with RESOLVE_BENEATH|RESOLVE_NO_MAGICLINKS:
a symlink inside the workspace is followed while it stays beneath the root, one that leaves it (an
absolute target, or `..` past the root) fails. Elsewhere (no openat2, or a seccomp profile that
hides it) the path is walked one component at a time with O_NOFOLLOW from directory descriptors,
which refuses every symlink. `..` is refused before either.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform

from baaaht.agent.tools.errors import ToolError, from_os_error

_SYS_OPENAT2 = {"x86_64": 437, "aarch64": 437}.get(platform.machine())
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_BENEATH = 0x08
_libc = ctypes.CDLL(None, use_errno=True)


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _openat2(dir_fd: int, path: str, flags: int, mode: int) -> int:
    how = _OpenHow(flags, mode if flags & os.O_CREAT else 0, _RESOLVE_BENEATH | _RESOLVE_NO_MAGICLINKS)
    fd = _libc.syscall(_SYS_OPENAT2, dir_fd, os.fsencode(path), ctypes.byref(how), ctypes.sizeof(how))
    if fd < 0:
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number), path)
    return fd


def openat2_available() -> bool:
    if _SYS_OPENAT2 is None:
        return False
    try:
        os.close(_openat2(os.open("/", os.O_PATH), ".", os.O_PATH | os.O_CLOEXEC, 0))
    except OSError as error:
        return error.errno not in (errno.ENOSYS, errno.EPERM)
    return True


class Workspace:
    """A workspace root and the one way of opening anything in it."""

    def __init__(self, root: str, *, use_openat2: bool | None = None) -> None:
        self.root = os.path.realpath(root)
        self.root_fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.uses_openat2 = openat2_available() if use_openat2 is None else use_openat2

    def close(self) -> None:
        os.close(self.root_fd)

    def relative(self, path: str) -> str:
        """The path relative to the root, refusing `..` and absolute paths outside the workspace."""
        if "\0" in path:
            raise ToolError.invalid(f"path {path!r} holds a NUL byte", path)
        if os.path.isabs(path):
            inside = os.path.normpath(path)
            if inside != self.root and not inside.startswith(self.root.rstrip("/") + "/"):
                raise ToolError.denied(f"path {path!r} is outside the workspace {self.root}", path)
            path = os.path.relpath(inside, self.root)
        parts = [part for part in path.split("/") if part not in ("", ".")]
        if ".." in parts:
            raise ToolError.denied(f"path {path!r} has a `..` component; paths stay in the workspace", path)
        return "/".join(parts) or "."

    def open(self, path: str, flags: int, mode: int = 0o666) -> int:
        """A descriptor of `path` beneath the root (the caller closes it)."""
        relative = self.relative(path)
        flags |= os.O_CLOEXEC
        try:
            if self.uses_openat2:
                return _openat2(self.root_fd, relative, flags, mode)
            return self._walk_open(relative, flags, mode)
        except OSError as error:
            raise from_os_error(error, path) from None

    def open_dir(self, path: str) -> int:
        return self.open(path, os.O_RDONLY | os.O_DIRECTORY)

    def open_parent(self, path: str, *, create: bool = False) -> tuple[int, str]:
        """(a descriptor of the parent directory, the last component), for creating or renaming."""
        relative = self.relative(path)
        if relative == ".":
            raise ToolError.invalid(f"path {path!r} names the workspace root, not a file", path)
        parent, _, name = relative.rpartition("/")
        if create and parent:
            self._make_dirs(parent, path)
        return self.open_dir(parent or "."), name

    def _make_dirs(self, parent: str, path: str) -> None:
        done = ""
        for part in parent.split("/"):
            fd = self.open_dir(done or ".")
            try:
                os.mkdir(part, 0o777, dir_fd=fd)
            except FileExistsError:
                pass
            except OSError as error:
                raise from_os_error(error, path) from None
            finally:
                os.close(fd)
            done = f"{done}/{part}" if done else part

    def _walk_open(self, relative: str, flags: int, mode: int) -> int:
        parts = [] if relative == "." else relative.split("/")
        fd = os.dup(self.root_fd)
        try:
            for part in parts[:-1]:
                next_fd = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                os.close(fd)
                fd = next_fd
            if not parts:
                return os.open(".", flags, mode, dir_fd=fd)
            return os.open(parts[-1], flags | os.O_NOFOLLOW, mode, dir_fd=fd)
        finally:
            os.close(fd)
