"""The worker's tools: one typed call and one result per tool.

A tool call is not a bus RPC: it travels as the msgpack payload of a scheduler task on a session's
worker queue, and its result (or an ErrorBody) is the task's result. Calls are tagged by the tool's
name in the `tool` field, so one decoder takes any of them; `tool_schemas()` gives each tool's JSON
Schema for an LLM's tool definitions, from the same types. Paths are relative to the session's
workspace (an absolute path must lie inside it); sizes are bytes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

MAX_PATH = 4096
MAX_READ = 4 * 1024 * 1024
MAX_WRITE = 16 * 1024 * 1024
MAX_ENTRIES = 10_000
MAX_OUTPUT = 64 * 1024 * 1024  # per stream of one exec
MAX_EXEC_SECONDS = 3600.0
MAX_FETCH_BODY = 64 * 1024 * 1024
EGRESS_BASE_URL = "http://egress/"  # the only URLs fetch takes: routes of the egress proxy
TOOLS_QUEUE = "tools"  # the scheduler queue of every session's tool calls (task_type: the tool's name)

WorkspacePath = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=MAX_PATH,
        description="A path in the workspace, relative to its root; no `..`.",
    ),
]
Line = Annotated[int, msgspec.Meta(ge=1, description="A line number, from 1.")]
LastLine = Annotated[int, msgspec.Meta(ge=0, description="The last line, inclusive; 0: to the end.")]
EnvName = Annotated[str, msgspec.Meta(pattern="^[A-Za-z_][A-Za-z0-9_]{0,127}$")]
EnvValue = Annotated[str, msgspec.Meta(max_length=32 * 1024)]


class ToolCall(msgspec.Struct, kw_only=True, tag_field="tool", omit_defaults=True):
    """A call of one tool; its tag is the tool's name."""


class ToolOutput(msgspec.Struct, kw_only=True, tag_field="type", omit_defaults=True):
    """A tool's result, or one chunk of a streamed one."""


class ToolReadFile(ToolCall, tag="read_file", kw_only=True):
    """Read a text file, whole or a range of lines, up to max_bytes."""

    path: WorkspacePath
    start_line: Line = 1
    end_line: LastLine = 0
    max_bytes: Annotated[int, msgspec.Meta(ge=1, le=MAX_READ)] = 256 * 1024


class ToolReadFileResult(ToolOutput, tag="read_file.result", kw_only=True):
    path: str
    content: str  # UTF-8; undecodable bytes replaced
    start_line: int
    end_line: int  # the last line returned (start_line - 1: none)
    size: int  # of the whole file
    truncated: bool = False  # stopped at max_bytes before end_line


class ToolWriteFile(ToolCall, tag="write_file", kw_only=True):
    """Write a whole file atomically (a reader sees the old or the new content, never a mix)."""

    path: WorkspacePath
    content: Annotated[str, msgspec.Meta(max_length=MAX_WRITE)]
    create_dirs: bool = False  # create missing parent directories


class ToolWriteFileResult(ToolOutput, tag="write_file.result", kw_only=True):
    path: str
    size: int
    created: bool  # the file did not exist before


class ToolEditFile(ToolCall, tag="edit_file", kw_only=True):
    """Replace `old` (which must occur exactly once) by `new`, or lines start_line..end_line by `new`."""

    path: WorkspacePath
    old: Annotated[str, msgspec.Meta(max_length=MAX_WRITE)] = ""
    new: Annotated[str, msgspec.Meta(max_length=MAX_WRITE)] = ""
    start_line: Annotated[int, msgspec.Meta(ge=0, description="0: replace `old` instead.")] = 0
    end_line: LastLine = 0


class ToolEditFileResult(ToolOutput, tag="edit_file.result", kw_only=True):
    path: str
    size: int
    first_line: int  # where the replacement starts


class DirEntry(msgspec.Struct, kw_only=True, omit_defaults=True):
    name: str
    kind: Literal["file", "dir", "symlink", "other"]
    size: int = 0  # of a file


class ToolListDir(ToolCall, tag="list_dir", kw_only=True):
    """The entries of a directory, sorted by name, with their kind and size."""

    path: WorkspacePath = "."
    max_entries: Annotated[int, msgspec.Meta(ge=1, le=MAX_ENTRIES)] = 1000


class ToolListDirResult(ToolOutput, tag="list_dir.result", kw_only=True):
    path: str
    entries: list[DirEntry]  # sorted by name
    truncated: bool = False


class ToolGlob(ToolCall, tag="glob", kw_only=True):
    """Paths matching a pattern (`*`, `?`, `[...]`, `**` for any depth); symlinks are not followed."""

    pattern: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_PATH)]
    path: WorkspacePath = "."
    max_matches: Annotated[int, msgspec.Meta(ge=1, le=MAX_ENTRIES)] = 1000


class ToolGlobResult(ToolOutput, tag="glob.result", kw_only=True):
    matches: list[str]  # relative to the workspace root, sorted
    truncated: bool = False


class GrepMatch(msgspec.Struct, kw_only=True, omit_defaults=True):
    path: str
    line: int
    text: str
    before: list[str] = []
    after: list[str] = []


class ToolGrep(ToolCall, tag="grep", kw_only=True):
    """Lines matching a regular expression (Python syntax) in the files below `path`."""

    pattern: Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]
    path: WorkspacePath = "."
    include: Annotated[str, msgspec.Meta(max_length=MAX_PATH)] = ""  # a glob the file must match
    ignore_case: bool = False
    context_lines: Annotated[int, msgspec.Meta(ge=0, le=20)] = 0
    max_matches: Annotated[int, msgspec.Meta(ge=1, le=MAX_ENTRIES)] = 200
    max_line_length: Annotated[int, msgspec.Meta(ge=16, le=64 * 1024)] = 1000
    max_file_size: Annotated[int, msgspec.Meta(ge=1, le=256 * 1024 * 1024)] = 8 * 1024 * 1024


class ToolGrepResult(ToolOutput, tag="grep.result", kw_only=True):
    matches: list[GrepMatch]
    files_searched: int
    truncated: bool = False  # more matches than max_matches
    skipped: list[str] = []  # binary or larger than max_file_size


class ToolExec(ToolCall, tag="exec", kw_only=True):
    """Run a program (argv; a shell only if argv says `sh -c`) in its own process group."""

    argv: Annotated[list[Annotated[str, msgspec.Meta(max_length=128 * 1024)]], msgspec.Meta(min_length=1)]
    cwd: WorkspacePath = "."
    env: Annotated[dict[EnvName, EnvValue], msgspec.Meta(max_length=128)] = {}
    stdin: Annotated[str, msgspec.Meta(max_length=MAX_WRITE)] = ""
    timeout: Annotated[float, msgspec.Meta(gt=0, le=MAX_EXEC_SECONDS)] = 60.0  # then SIGTERM
    kill_after: Annotated[float, msgspec.Meta(gt=0, le=60)] = 5.0  # after SIGTERM: SIGKILL
    max_output: Annotated[int, msgspec.Meta(ge=1, le=MAX_OUTPUT)] = 1024 * 1024  # per stream


class ToolExecChunk(ToolOutput, tag="exec.chunk", kw_only=True):
    """Output as it comes; the chunk with `truncated` is the marker after which a stream was cut."""

    stream: Literal["stdout", "stderr"]
    data: str
    truncated: bool = False


class ToolExecResult(ToolOutput, tag="exec.result", kw_only=True):
    exit_code: int  # -N: killed by signal N
    timed_out: bool = False
    stdout_bytes: int = 0  # produced, kept or not
    stderr_bytes: int = 0
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    duration: float = 0.0  # seconds


class ToolFetch(ToolCall, tag="fetch", kw_only=True):
    """An HTTP call through the egress proxy: `url` starts with http://egress/<route>/."""

    url: Annotated[str, msgspec.Meta(min_length=1, max_length=8192)]
    method: Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"] = "GET"
    headers: Annotated[
        dict[str, Annotated[str, msgspec.Meta(max_length=8192)]], msgspec.Meta(max_length=64)
    ] = {}
    body: Annotated[str, msgspec.Meta(max_length=MAX_FETCH_BODY)] = ""
    timeout: Annotated[float, msgspec.Meta(gt=0, le=600)] = 60.0
    max_bytes: Annotated[int, msgspec.Meta(ge=1, le=MAX_FETCH_BODY)] = 1024 * 1024


class ToolFetchResult(ToolOutput, tag="fetch.result", kw_only=True):
    status: int
    headers: dict[str, str]
    body: str  # UTF-8; undecodable bytes replaced
    truncated: bool = False  # the body was longer than max_bytes


TOOLS: tuple[type[ToolCall], ...] = (
    ToolReadFile,
    ToolWriteFile,
    ToolEditFile,
    ToolListDir,
    ToolGlob,
    ToolGrep,
    ToolExec,
    ToolFetch,
)
AnyToolCall = (
    ToolReadFile | ToolWriteFile | ToolEditFile | ToolListDir | ToolGlob | ToolGrep | ToolExec | ToolFetch
)
CALL_DECODER = msgspec.msgpack.Decoder(AnyToolCall)
AnyToolOutput = (
    ToolReadFileResult
    | ToolWriteFileResult
    | ToolEditFileResult
    | ToolListDirResult
    | ToolGlobResult
    | ToolGrepResult
    | ToolExecChunk
    | ToolExecResult
    | ToolFetchResult
)
OUTPUT_DECODER = msgspec.msgpack.Decoder(AnyToolOutput)  # a tool task's result, or an exec chunk


def tool_name(call: type[ToolCall]) -> str:
    return call.__struct_config__.tag


def tool_schemas() -> list[dict[str, Any]]:
    """Every tool as an LLM tool definition: name, description and the JSON Schema of its input."""
    found = []
    for call in TOOLS:
        (schema,), components = msgspec.json.schema_components([call], ref_template="#/$defs/{name}")
        body = dict(components[call.__name__])
        body["properties"] = {k: v for k, v in body["properties"].items() if k != "tool"}
        body["required"] = [k for k in body.get("required", []) if k != "tool"]
        defs = {name: value for name, value in components.items() if name != call.__name__}
        if defs:
            body["$defs"] = defs
        description = body.pop("description", "") or body.pop("title", "")
        body.pop("title", None)
        found.append({"name": tool_name(call), "description": description, "input_schema": body})
    return found
