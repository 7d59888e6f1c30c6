"""A tool's failure, as data: an error code, a message naming the problem, and details."""

from __future__ import annotations

import errno
from typing import Any

from baaaht.schemas.errors import ErrorBody, ErrorCode

_BY_ERRNO = {
    errno.ENOENT: (ErrorCode.NOT_FOUND, "does not exist"),
    errno.EEXIST: (ErrorCode.ALREADY_EXISTS, "already exists"),
    errno.EXDEV: (ErrorCode.PERMISSION_DENIED, "leads outside the workspace (through a symlink)"),
    errno.ELOOP: (ErrorCode.PERMISSION_DENIED, "goes through a symlink that is refused"),
    errno.ENOTDIR: (
        ErrorCode.FAILED_PRECONDITION,
        "has a component that is not a directory (or is a symlink)",
    ),
    errno.EISDIR: (ErrorCode.FAILED_PRECONDITION, "is a directory"),
    errno.EACCES: (ErrorCode.PERMISSION_DENIED, "is not accessible"),
    errno.EPERM: (ErrorCode.PERMISSION_DENIED, "is not permitted"),
    errno.ENOSPC: (ErrorCode.RESOURCE_EXHAUSTED, "cannot be written: no space left"),
    errno.EDQUOT: (ErrorCode.RESOURCE_EXHAUSTED, "cannot be written: quota exceeded"),
}


class ToolError(Exception):
    def __init__(self, code: ErrorCode, message: str, **details: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details

    @classmethod
    def invalid(cls, message: str, path: str = "", **details: Any) -> ToolError:
        return cls(ErrorCode.INVALID_ARGUMENT, message, **({"path": path} if path else {}), **details)

    @classmethod
    def denied(cls, message: str, path: str) -> ToolError:
        return cls(ErrorCode.PERMISSION_DENIED, message, path=path)

    def body(self) -> ErrorBody:
        return ErrorBody(code=self.code, message=self.message, details=self.details)


def from_os_error(error: OSError, path: str) -> ToolError:
    code, what = _BY_ERRNO.get(error.errno, (ErrorCode.INTERNAL, f"failed: {error.strerror}"))
    return ToolError(code, f"path {path!r} {what}", path=path, errno=errno.errorcode.get(error.errno, ""))
