"""The operator's file operations in a session's workspace (`container.workspace_*`): listing, reading by
offset, and atomic writes in one call or as a chunked upload, all through the tools' beneath-the-root opens
(agent/tools/workspace.py, agent/tools/files.py), done as the workspace's owner, the agent user: the
operator reaches in the workspace what its agent reaches, and what it writes is the agent's to change.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
from typing import Iterator

from baaaht.agent.tools.errors import ToolError, from_os_error
from baaaht.agent.tools.files import kind_of, list_dir, open_regular, replace_atomically
from baaaht.agent.tools.workspace import Workspace
from baaaht.schemas.errors import ErrorCode
from baaaht.schemas.tools import ToolListDir
from baaaht.schemas.workspaces import (
    ContainerWorkspaceList,
    ContainerWorkspaceRead,
    ContainerWorkspaceWrite,
    WorkspaceData,
    WorkspaceEntries,
    WorkspaceWritten,
)

UPLOAD_SUFFIX = ".upload"
_libc = ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def as_owner(workspace_root: str) -> Iterator[Workspace]:
    """The workspace, used with this thread's filesystem uid and gid set to its root's owner
    (setfsuid/setfsgid act on the calling thread only), restored afterwards. The root is opened first,
    as this process: the directories above it need not be open to the agent user."""
    workspace = Workspace(workspace_root)
    try:
        info = os.fstat(workspace.root_fd)
        _libc.setfsgid(info.st_gid)
        _libc.setfsuid(info.st_uid)
        try:
            yield workspace
        finally:
            _libc.setfsuid(os.geteuid())
            _libc.setfsgid(os.getegid())
    finally:
        workspace.close()


def entries(workspace: Workspace, req: ContainerWorkspaceList) -> WorkspaceEntries:
    fd = workspace.open(req.path, os.O_PATH)
    try:
        info = os.fstat(fd)
    finally:
        os.close(fd)
    kind = kind_of(info.st_mode)
    if kind != "dir":
        return WorkspaceEntries(path=req.path, kind=kind, size=info.st_size if kind == "file" else 0)
    listing = list_dir(workspace, ToolListDir(path=req.path, max_entries=req.max_entries))
    return WorkspaceEntries(path=req.path, kind="dir", entries=listing.entries, truncated=listing.truncated)


def read(workspace: Workspace, req: ContainerWorkspaceRead) -> WorkspaceData:
    """Up to `length` bytes of the file's data from `offset` on: past a hole (a sparse file's unwritten
    range, zeros) to where data starts, and never into the next hole. An agent's `truncate -s 10T` is
    then read as its few data bytes and the size, not as 10 TB of zeros."""
    fd = open_regular(workspace, req.path)
    try:
        size = os.fstat(fd).st_size
        start, end = data_range(fd, req.offset, size)
        data = os.pread(fd, min(req.length, end - start), start)
    except OSError as error:
        raise from_os_error(error, req.path) from None
    finally:
        os.close(fd)
    return WorkspaceData(path=req.path, offset=start, data=data, size=size)


def data_range(fd: int, offset: int, size: int) -> tuple[int, int]:
    """(start, end) of the first range of data at or after `offset`; (size, size) when there is none."""
    if offset >= size:
        return size, size
    try:
        start = os.lseek(fd, offset, os.SEEK_DATA)
    except OSError as error:
        if error.errno != errno.ENXIO:  # ENXIO: only a hole from offset to the end
            raise
        return size, size
    return start, os.lseek(fd, start, os.SEEK_HOLE)


def write(workspace: Workspace, req: ContainerWorkspaceWrite) -> WorkspaceWritten:
    if not req.upload:
        if req.offset or not req.final:
            raise ToolError.invalid(
                "a write in chunks names its upload (an id of 16-64 hex digits, the same in every chunk)"
            )
        created = replace_atomically(workspace, req.path, req.data, create_dirs=req.create_dirs)
        return WorkspaceWritten(path=req.path, size=len(req.data), created=created)
    dir_fd, name = workspace.open_parent(req.path, create=req.create_dirs)
    staged = f".{name}.{req.upload}{UPLOAD_SUFFIX}"
    try:
        size = _write_chunk(dir_fd, staged, req)
        if not req.final:
            return WorkspaceWritten(path=req.path, size=size)
        try:
            existing = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            existing = None
        if existing is not None and stat.S_ISDIR(existing.st_mode):
            raise ToolError(ErrorCode.FAILED_PRECONDITION, f"path {req.path!r} is a directory", path=req.path)
        # rename replaces a symlink at `name` itself, never the file it points to
        os.rename(staged, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        return WorkspaceWritten(path=req.path, size=size, created=existing is None)
    except OSError as error:
        raise from_os_error(error, req.path) from None
    finally:
        os.close(dir_fd)


def _write_chunk(dir_fd: int, staged: str, req: ContainerWorkspaceWrite) -> int:
    """Write the chunk into the staged upload; the upload's size after it. A failed write (a full
    workspace) deletes the upload, so it takes no space."""
    # O_NONBLOCK: the agent owns the directory and may swap the upload for a FIFO between two chunks; a
    # FIFO's open then fails (ENXIO) or is refused below instead of blocking this handler thread for good
    flags = os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    not_regular = ToolError(ErrorCode.FAILED_PRECONDITION, f"upload {staged!r} is not a regular file")
    try:
        fd = os.open(
            staged, flags | (os.O_CREAT | os.O_TRUNC if req.offset == 0 else 0), 0o644, dir_fd=dir_fd
        )
    except FileNotFoundError:
        raise ToolError(
            ErrorCode.FAILED_PRECONDITION,
            f"upload {req.upload} of {req.path!r} has not begun (or has failed): its first chunk has "
            "offset 0",
            path=req.path,
        ) from None
    except OSError as error:
        if error.errno != errno.ENXIO:
            raise
        raise not_regular from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise not_regular
        so_far = os.fstat(fd).st_size
        if req.offset > so_far:
            raise ToolError(
                ErrorCode.FAILED_PRECONDITION,
                f"upload {req.upload} of {req.path!r} holds {so_far} bytes: the next chunk has offset "
                f"{so_far}, not {req.offset}",
                path=req.path,
                size=so_far,
            )
        try:
            os.ftruncate(fd, req.offset)  # a chunk sent again replaces what it wrote before
            written = 0
            while written < len(req.data):
                written += os.pwrite(fd, req.data[written:], req.offset + written)
            if req.final:
                os.fsync(fd)
        except OSError:
            os.unlink(staged, dir_fd=dir_fd)
            raise
        return req.offset + len(req.data)
    finally:
        os.close(fd)
