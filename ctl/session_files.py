"""`baaaht-ctl sessions files S [PATH]` and `baaaht-ctl sessions cp`: a session's workspace, for the operator.

Both speak the container manager's `container.workspace_*` calls; a file moves in chunks of at most
WORKSPACE_CHUNK bytes, and an upload of several chunks replaces the file only with its last one.
"""

from __future__ import annotations

import os
import re
import secrets
import sys
import tempfile
from typing import BinaryIO, Iterator

import typer

from baaaht.bus.errors import BusError
from baaaht.ctl.common import Ctl, JsonOption, fail
from baaaht.schemas.errors import ErrorCode
from baaaht.schemas.ids import ID_PATTERN
from baaaht.schemas.workspaces import (
    WORKSPACE_CHUNK,
    ContainerWorkspaceList,
    ContainerWorkspaceRead,
    ContainerWorkspaceWrite,
    WorkspaceData,
    WorkspaceEntries,
)

PRINTED_HOLES = 64 * 1024 * 1024  # bytes of a sparse file's holes `files` prints as zeros, at most
# SESSION:PATH; a local path holding a ':' is written ./a:b (what comes before the ':' is no session id).
_REMOTE = re.compile(rf"(?P<session>{ID_PATTERN[1:-1]}):(?P<path>.*)", re.DOTALL)


def files(
    ctx: typer.Context,
    session_id: str = typer.Argument(..., metavar="SESSION", help="Session id."),
    path: str = typer.Argument(
        ".", help="A directory (its entries) or a file (its content) in the workspace."
    ),
    _json: JsonOption = False,
) -> None:
    """A session's workspace: a directory's entries as a table, a file's content on stdout."""
    ctl: Ctl = ctx.obj
    found: WorkspaceEntries = ctl.call(
        ContainerWorkspaceList(session_id=session_id, path=path, max_entries=10_000)
    )
    if ctl.json:
        ctl.emit(found)
        return
    if found.kind == "dir":
        ctl.emit(
            [{"name": e.name, "kind": e.kind, "size": e.size} for e in found.entries],
            ["name", "kind", "size"],
        )
        if found.truncated:
            typer.echo(f"(only the first {len(found.entries)} entries)", err=True)
    elif found.kind == "file":
        print_file(ctl, session_id, path, sys.stdout.buffer)
    else:
        what = "a symlink" if found.kind == "symlink" else "not a regular file"
        fail(f"{session_id}:{path} is {what}: nothing to show")


def cp(
    ctx: typer.Context,
    source: str = typer.Argument(..., metavar="SOURCE", help="SESSION:PATH or a local file."),
    destination: str = typer.Argument(..., metavar="DEST", help="A local path or SESSION:PATH."),
    _json: JsonOption = False,
) -> None:
    """Copy a file out of a session's workspace (`cp S:PATH LOCAL`) or into it (`cp LOCAL S:PATH`).

    A directory as destination (or a path ending in /) gets the file under its own name. A copy into a
    workspace is atomic and makes the directories it needs.
    """
    ctl: Ctl = ctx.obj
    remote_source, remote_destination = _REMOTE.fullmatch(source), _REMOTE.fullmatch(destination)
    if bool(remote_source) == bool(remote_destination):
        fail(
            "give one SESSION:PATH and one local path (`cp S:notes.txt ./notes.txt` or "
            "`cp ./notes.txt S:notes.txt`); a local path with ':' is written ./a:b"
        )
    if remote_source:
        session_id, path = remote_source["session"], remote_source["path"] or "."
        written, size = download(ctl, session_id, path, destination)
        report = {"source": f"{session_id}:{path}", "destination": written, "size": size}
    else:
        session_id, path = remote_destination["session"], remote_destination["path"] or "."
        written, size = upload(ctl, source, session_id, path)
        report = {"source": source, "destination": f"{session_id}:{written}", "size": size}
    if ctl.json:
        ctl.emit(report)
    else:
        typer.echo(f"copied {size} bytes to {report['destination']}", err=True)


def read_chunks(ctl: Ctl, session_id: str, path: str) -> Iterator[WorkspaceData]:
    """The file's data as the service sends it, a range at a time (its holes skipped); the last chunk
    names the size, so a hole at the end is known too."""
    offset = 0
    while True:
        chunk = ctl.call(ContainerWorkspaceRead(session_id=session_id, path=path, offset=offset))
        yield chunk
        offset = chunk.offset + len(chunk.data)
        if not chunk.data or offset >= chunk.size:
            return


def print_file(ctl: Ctl, session_id: str, path: str, out: BinaryIO) -> None:
    """The file's content, its holes as the zeros they read as, but no more than PRINTED_HOLES of them:
    an agent's `truncate -s 10T` is not 10 TB of zeros on stdout (`cp` keeps the holes)."""
    at = holes = 0
    for chunk in read_chunks(ctl, session_id, path):
        # No data: the file ends at its size, which is below `at` if it shrank since the last read.
        gap = max(0, (chunk.offset if chunk.data else chunk.size) - at)
        holes += gap
        if holes > PRINTED_HOLES:
            fail(
                f"{session_id}:{path} is a sparse file with more than {PRINTED_HOLES} bytes of holes "
                f"(size {chunk.size}): not printed; `baaaht-ctl sessions cp {session_id}:{path} LOCAL` "
                "copies it keeping the holes"
            )
        out.write(bytes(gap))
        out.write(chunk.data)
        at += gap + len(chunk.data)
    out.flush()


def download(ctl: Ctl, session_id: str, path: str, local: str) -> tuple[str, int]:
    """(the local file written, its size); written beside it and renamed into place. A sparse file's
    holes stay holes: only its data is sent and written, so its size on disk is its data's."""
    if os.path.isdir(local):
        local = os.path.join(local, os.path.basename(path.rstrip("/")))
    directory = os.path.dirname(os.path.abspath(local))
    try:
        fd, partial = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(local)}.", suffix=".part")
    except OSError as error:
        fail(f"cannot write {local}: {error.strerror}")
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # as any new file of this user's, not mkstemp's 0600
    size = 0
    try:
        try:
            for chunk in read_chunks(ctl, session_id, path):
                written = 0
                while written < len(chunk.data):
                    written += os.pwrite(fd, chunk.data[written:], chunk.offset + written)
                size = chunk.size
            os.ftruncate(fd, size)  # a hole at the end
        finally:
            os.close(fd)
        os.replace(partial, local)
    except OSError as error:
        fail(f"cannot write {local}: {error.strerror}")
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return local, size


def upload(ctl: Ctl, local: str, session_id: str, path: str) -> tuple[str, int]:
    """(the workspace path written, its size)."""
    try:
        source = open(local, "rb")
    except OSError as error:
        fail(f"cannot read {local}: {error.strerror}")
    with source:
        if path.endswith("/") or _is_dir(ctl, session_id, path):
            path = (
                f"{path.rstrip('/')}/{os.path.basename(local)}"
                if path.strip("/.")
                else os.path.basename(local)
            )
        chunk, upload_id, offset = _read(source, local), "", 0
        while True:
            following = _read(source, local) if len(chunk) == WORKSPACE_CHUNK else b""
            if following and not upload_id:
                upload_id = secrets.token_hex(16)
            ctl.call(
                ContainerWorkspaceWrite(
                    session_id=session_id,
                    path=path,
                    data=chunk,
                    offset=offset,
                    upload=upload_id,
                    final=not following,
                    create_dirs=True,
                )
            )
            offset += len(chunk)
            if not following:
                return path, offset
            chunk = following


def _read(source: BinaryIO, local: str) -> bytes:
    try:
        return source.read(WORKSPACE_CHUNK)
    except OSError as error:
        fail(f"cannot read {local}: {error.strerror}")


def _is_dir(ctl: Ctl, session_id: str, path: str) -> bool:
    request = ContainerWorkspaceList(session_id=session_id, path=path, max_entries=1)
    try:
        return ctl.client.call(request).kind == "dir"
    except BusError as error:
        new_file = error.details.get("path") or error.details.get("workspace") == "none"
        if error.code is ErrorCode.NOT_FOUND and new_file:
            return False  # the write makes it (and the workspace)
        ctl.explain(error)
