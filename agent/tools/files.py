"""The file tools: read, write (atomic), edit, list, glob and grep, all through Workspace opens."""

from __future__ import annotations

import os
import re
import secrets
import stat
from collections import deque
from collections.abc import Iterator

from baaaht.agent.tools.errors import ToolError, from_os_error
from baaaht.agent.tools.patterns import compile_glob
from baaaht.agent.tools.workspace import Workspace
from baaaht.schemas.errors import ErrorCode
from baaaht.schemas.tools import (
    DirEntry,
    GrepMatch,
    ToolEditFile,
    ToolEditFileResult,
    ToolGlob,
    ToolGlobResult,
    ToolGrep,
    ToolGrepResult,
    ToolListDir,
    ToolListDirResult,
    ToolReadFile,
    ToolReadFileResult,
    ToolWriteFile,
    ToolWriteFileResult,
)

_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK  # a FIFO never blocks a read; it is refused below


def open_regular(workspace: Workspace, path: str) -> int:
    fd = workspace.open(path, _READ_FLAGS)
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise ToolError(ErrorCode.FAILED_PRECONDITION, f"path {path!r} is {kind}", path=path)
    return fd


def read_file(workspace: Workspace, call: ToolReadFile) -> ToolReadFileResult:
    if call.end_line and call.end_line < call.start_line:
        raise ToolError.invalid(f"end_line {call.end_line} is before start_line {call.start_line}")
    fd = open_regular(workspace, call.path)
    with os.fdopen(fd, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        kept: list[bytes] = []
        used = 0
        truncated = False
        for number, line in enumerate(file, start=1):
            if number < call.start_line:
                continue
            if call.end_line and number > call.end_line:
                break
            if used + len(line) > call.max_bytes:
                kept.append(line[: call.max_bytes - used])
                truncated = True
                break
            kept.append(line)
            used += len(line)
        last = call.start_line - 1 + len(kept)
    return ToolReadFileResult(
        path=call.path,
        content=b"".join(kept).decode("utf-8", "replace"),
        start_line=call.start_line,
        end_line=last,
        size=size,
        truncated=truncated,
    )


def replace_atomically(workspace: Workspace, path: str, data: bytes, *, create_dirs: bool) -> bool:
    """Write `data` to a new file beside `path` and rename it over `path`; True if it was new."""
    dir_fd, name = workspace.open_parent(path, create=create_dirs)
    temporary = f".{name}.{secrets.token_hex(6)}.tmp"
    try:
        try:
            existing = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            existing = None
        if existing is not None and stat.S_ISDIR(existing.st_mode):
            raise ToolError(ErrorCode.FAILED_PRECONDITION, f"path {path!r} is a directory", path=path)
        mode = stat.S_IMODE(existing.st_mode) if existing and stat.S_ISREG(existing.st_mode) else 0o644
        fd = os.open(
            temporary,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            mode,
            dir_fd=dir_fd,
        )
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            # rename replaces a symlink at `name` itself, never the file it points to
            os.rename(temporary, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            try:
                os.unlink(temporary, dir_fd=dir_fd)
            except FileNotFoundError:
                pass
            raise
        return existing is None
    except OSError as error:
        raise from_os_error(error, path) from None
    finally:
        os.close(dir_fd)


def write_file(workspace: Workspace, call: ToolWriteFile) -> ToolWriteFileResult:
    data = call.content.encode()
    created = replace_atomically(workspace, call.path, data, create_dirs=call.create_dirs)
    return ToolWriteFileResult(path=call.path, size=len(data), created=created)


def edit_file(workspace: Workspace, call: ToolEditFile) -> ToolEditFileResult:
    fd = open_regular(workspace, call.path)
    with os.fdopen(fd, "rb") as file:
        text = file.read().decode("utf-8", "surrogateescape")
    if call.start_line:
        if call.old:
            raise ToolError.invalid("give either `old` or a line range (start_line), not both")
        lines = text.splitlines(keepends=True)
        end = call.end_line or call.start_line
        if end < call.start_line or end > len(lines):
            raise ToolError.invalid(
                f"lines {call.start_line}-{end} are not in {call.path!r}, which has {len(lines)} lines",
                call.path,
                lines=len(lines),
            )
        replacement = (
            call.new if not call.new or call.new.endswith("\n") or end == len(lines) else call.new + "\n"
        )
        edited = "".join(lines[: call.start_line - 1]) + replacement + "".join(lines[end:])
        first_line = call.start_line
    else:
        if not call.old:
            raise ToolError.invalid("give the exact text to replace (`old`) or a line range (start_line)")
        count = text.count(call.old)
        if count != 1:
            raise ToolError(
                ErrorCode.FAILED_PRECONDITION,
                f"`old` occurs {count} times in {call.path!r}; it must occur exactly once",
                path=call.path,
                occurrences=count,
            )
        at = text.index(call.old)
        edited = text[:at] + call.new + text[at + len(call.old) :]
        first_line = text.count("\n", 0, at) + 1
    data = edited.encode("utf-8", "surrogateescape")
    replace_atomically(workspace, call.path, data, create_dirs=False)
    return ToolEditFileResult(path=call.path, size=len(data), first_line=first_line)


def kind_of(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


def list_dir(workspace: Workspace, call: ToolListDir) -> ToolListDirResult:
    fd = workspace.open_dir(call.path)
    try:
        with os.scandir(fd) as scan:
            found = sorted(scan, key=lambda entry: entry.name)
        entries = []
        for entry in found[: call.max_entries]:
            info = entry.stat(follow_symlinks=False)
            kind = kind_of(info.st_mode)
            entries.append(DirEntry(name=entry.name, kind=kind, size=info.st_size if kind == "file" else 0))
    finally:
        os.close(fd)
    return ToolListDirResult(path=call.path, entries=entries, truncated=len(found) > call.max_entries)


def _walk(workspace: Workspace, start: str) -> Iterator[tuple[str, int, int, str]]:
    """(path relative to the root, its directory's fd, mode, name) of everything below `top`,
    depth first, sorted, never following a symlink; each fd is valid until the next item."""
    stack = [(start, workspace.open_dir(start))]
    while stack:
        prefix, fd = stack.pop()
        try:
            with os.scandir(fd) as scan:
                entries = sorted(scan, key=lambda entry: entry.name, reverse=True)
            below = []
            for entry in reversed(entries):
                path = entry.name if prefix == "." else f"{prefix}/{entry.name}"
                mode = entry.stat(follow_symlinks=False).st_mode
                yield path, fd, mode, entry.name
                if stat.S_ISDIR(mode):
                    below.append((path, entry.name))
            for path, name in reversed(below):
                try:
                    child = os.open(
                        name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd
                    )
                except OSError:
                    continue  # swapped for a symlink or removed meanwhile: not followed
                stack.append((path, child))
        finally:
            os.close(fd)


def glob(workspace: Workspace, call: ToolGlob) -> ToolGlobResult:
    base = workspace.relative(call.path)
    matcher = compile_glob(call.pattern)
    matches: list[str] = []
    for path, _, _, _ in _walk(workspace, base):
        below = path if base == "." else path[len(base) + 1 :]
        if matcher.fullmatch(below):
            if len(matches) == call.max_matches:
                return ToolGlobResult(matches=sorted(matches), truncated=True)
            matches.append(path)
    return ToolGlobResult(matches=sorted(matches))


def _clip(line: bytes, limit: int) -> str:
    text = line.rstrip(b"\r\n").decode("utf-8", "replace")
    return text if len(text) <= limit else text[:limit] + " [line truncated]"


def _is_dir(workspace: Workspace, path: str) -> bool:
    fd = workspace.open(path, os.O_PATH)
    try:
        return stat.S_ISDIR(os.fstat(fd).st_mode)
    finally:
        os.close(fd)


def grep(workspace: Workspace, call: ToolGrep) -> ToolGrepResult:
    try:
        regex = re.compile(call.pattern.encode(), re.IGNORECASE if call.ignore_case else 0)
    except re.error as error:
        raise ToolError.invalid(
            f"pattern {call.pattern!r} is not a valid regular expression: {error}"
        ) from None
    include = compile_glob(call.include) if call.include else None
    matches: list[GrepMatch] = []
    skipped: list[str] = []
    searched = 0
    base = workspace.relative(call.path)
    if _is_dir(workspace, base):
        files = [
            path
            for path, _, mode, name in _walk(workspace, base)
            if stat.S_ISREG(mode) and (include is None or include.fullmatch(name) or include.fullmatch(path))
        ]
    else:
        files = [base]
    for path in files:
        try:
            fd = open_regular(workspace, path)
        except ToolError:
            continue  # removed or swapped meanwhile
        with os.fdopen(fd, "rb") as file:
            if os.fstat(file.fileno()).st_size > call.max_file_size or b"\0" in file.read(8192):
                skipped.append(path)
                continue
            file.seek(0)
            searched += 1
            before: deque[bytes] = deque(maxlen=call.context_lines)
            waiting: list[GrepMatch] = []  # matches still collecting their `after` lines
            for number, line in enumerate(file, start=1):
                for match in waiting:
                    match.after.append(_clip(line, call.max_line_length))
                waiting = [match for match in waiting if len(match.after) < call.context_lines]
                if regex.search(line):
                    if len(matches) == call.max_matches:
                        return ToolGrepResult(
                            matches=matches, files_searched=searched, truncated=True, skipped=skipped
                        )
                    found = GrepMatch(
                        path=path,
                        line=number,
                        text=_clip(line, call.max_line_length),
                        before=[_clip(kept, call.max_line_length) for kept in before],
                        after=[],
                    )
                    matches.append(found)
                    if call.context_lines:
                        waiting.append(found)
                before.append(line)
    return ToolGrepResult(matches=matches, files_searched=searched, skipped=skipped)
