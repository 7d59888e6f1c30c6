"""The operator's access to a session's workspace (`container.workspace_*`, host callers only).

Paths are the tools' paths (schemas/tools.py): relative to the workspace root, no `..`, an absolute path
only inside it; they are resolved beneath the root by the tools' own code (agent/tools/workspace.py), as
the agent user. A big file moves in chunks of at most WORKSPACE_CHUNK bytes: reads by offset, writes as one
upload staged beside the file and renamed over it by its last chunk.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import msgspec

from baaaht.schemas import ids
from baaaht.schemas.base import Request, Response
from baaaht.schemas.tools import MAX_ENTRIES, DirEntry, WorkspacePath

WORKSPACE_CHUNK = 4 * 1024 * 1024  # the most one workspace_read or workspace_write carries
Offset = Annotated[int, msgspec.Meta(ge=0, description="A byte offset in the file, from 0.")]
UploadId = Annotated[
    str,
    msgspec.Meta(
        pattern="^(?:[0-9a-f]{16,64})?$",
        description="Empty (the whole file in this call) or the upload's id: 16-64 lower-case hex digits.",
    ),
]


class WorkspaceEntries(Response, kw_only=True):
    """What `path` is (its kind after symlinks inside the workspace) and, for a directory, its entries
    sorted by name; `size` for a file."""

    path: str
    kind: Literal["file", "dir", "symlink", "other"]
    size: int = 0
    entries: list[DirEntry] = []
    truncated: bool = False  # more than max_entries entries


class ContainerWorkspaceList(Request, tag="container.workspace_list", kw_only=True):
    """List a directory of the session's workspace, or tell what a path is."""

    response: ClassVar[type] = WorkspaceEntries

    session_id: ids.SessionId
    path: WorkspacePath = "."
    max_entries: Annotated[int, msgspec.Meta(ge=1, le=MAX_ENTRIES)] = 1000


class WorkspaceData(Response, kw_only=True):
    """`data` read from `offset`; `size` is the whole file's, so the reader knows when it is done. A
    sparse file's holes (unwritten ranges, zeros) are skipped: `offset` is where the data starts, past
    the asked offset when that is in a hole, and the data stops at the next hole."""

    path: str
    offset: int
    data: bytes
    size: int


class ContainerWorkspaceRead(Request, tag="container.workspace_read", kw_only=True):
    """Read up to `length` bytes of a regular file of the session's workspace, from `offset`."""

    response: ClassVar[type] = WorkspaceData

    session_id: ids.SessionId
    path: WorkspacePath
    offset: Offset = 0
    length: Annotated[int, msgspec.Meta(ge=1, le=WORKSPACE_CHUNK)] = WORKSPACE_CHUNK


class WorkspaceWritten(Response, kw_only=True):
    path: str
    size: int  # bytes of the upload so far; the file's size once `final`
    created: bool = False  # final, and the file did not exist before


class ContainerWorkspaceWrite(Request, tag="container.workspace_write", kw_only=True):
    """Write a file of the session's workspace atomically (a reader sees the old file or the whole new
    one). In one call: `data` is the content (`upload` empty). In chunks: every chunk names the same
    `upload` id, the chunks come in order (`offset` = the bytes sent before; a chunk sent again is
    written again), the last one is `final` and renames the upload over the file. The session must be
    active or idle; files and directories made are the agent user's."""

    response: ClassVar[type] = WorkspaceWritten

    session_id: ids.SessionId
    path: WorkspacePath
    data: Annotated[bytes, msgspec.Meta(max_length=WORKSPACE_CHUNK)] = b""
    offset: Offset = 0
    upload: UploadId = ""
    final: bool = True
    create_dirs: bool = False  # make missing parent directories
