"""The file tools on temporary workspaces, with both ways of opening beneath the root (openat2 and the
component-by-component walk): every success, every error path, every way out of the workspace."""

from __future__ import annotations

import os

import pytest

from baaaht.agent.tools import files
from baaaht.agent.tools.errors import ToolError
from baaaht.agent.tools.workspace import Workspace, openat2_available
from baaaht.schemas.errors import ErrorCode
from baaaht.schemas.tools import (
    ToolEditFile,
    ToolGlob,
    ToolGrep,
    ToolListDir,
    ToolReadFile,
    ToolWriteFile,
)

BACKENDS = [pytest.param(False, id="walk")]
if openat2_available():
    BACKENDS.insert(0, pytest.param(True, id="openat2"))


@pytest.fixture(params=BACKENDS)
def ws(request, tmp_path):
    root = tmp_path / "workspace"
    root.mkdir()
    (tmp_path / "outside.txt").write_text("secret outside\n")
    workspace = Workspace(str(root), use_openat2=request.param)
    yield workspace
    workspace.close()


def write(ws: Workspace, path: str, text: str) -> None:
    full = os.path.join(ws.root, path)
    os.makedirs(os.path.dirname(full), exist_ok=True)
    with open(full, "w") as file:
        file.write(text)


def content(ws: Workspace, path: str) -> str:
    with open(os.path.join(ws.root, path)) as file:
        return file.read()


def refused(call, ws, tool) -> ToolError:
    with pytest.raises(ToolError) as caught:
        tool(ws, call)
    return caught.value


# read_file


def test_read_file_whole_and_ranges(ws):
    write(ws, "a.txt", "one\ntwo\nthree\nfour\n")
    whole = files.read_file(ws, ToolReadFile(path="a.txt"))
    assert (whole.content, whole.start_line, whole.end_line, whole.size) == (
        "one\ntwo\nthree\nfour\n",
        1,
        4,
        19,
    )
    middle = files.read_file(ws, ToolReadFile(path="a.txt", start_line=2, end_line=3))
    assert (middle.content, middle.end_line, middle.truncated) == ("two\nthree\n", 3, False)
    past = files.read_file(ws, ToolReadFile(path="a.txt", start_line=9))
    assert (past.content, past.end_line) == ("", 8)


def test_read_file_stops_at_the_size_cap(ws):
    write(ws, "big.txt", "x" * 100 + "\n" + "y" * 100 + "\n")
    got = files.read_file(ws, ToolReadFile(path="big.txt", max_bytes=150))
    assert got.truncated and len(got.content) == 150 and got.size == 202


def test_read_file_errors(ws):
    os.mkdir(os.path.join(ws.root, "dir"))
    assert refused(ToolReadFile(path="missing.txt"), ws, files.read_file).code == ErrorCode.NOT_FOUND
    assert refused(ToolReadFile(path="dir"), ws, files.read_file).code == ErrorCode.FAILED_PRECONDITION
    os.mkfifo(os.path.join(ws.root, "fifo"))
    error = refused(ToolReadFile(path="fifo"), ws, files.read_file)
    assert error.code == ErrorCode.FAILED_PRECONDITION and "not a regular file" in error.message
    write(ws, "a.txt", "x\n")
    error = refused(ToolReadFile(path="a.txt", start_line=3, end_line=2), ws, files.read_file)
    assert error.code == ErrorCode.INVALID_ARGUMENT and "end_line 2" in error.message


# path escapes (every tool goes through the same opens; read, write and list cover them)


@pytest.mark.parametrize("path", ["../outside.txt", "sub/../../outside.txt", "/etc/passwd", "/etc"])
def test_dot_dot_and_absolute_paths_outside_are_refused(ws, path):
    os.mkdir(os.path.join(ws.root, "sub"))
    for call, tool in (
        (ToolReadFile(path=path), files.read_file),
        (ToolWriteFile(path=path, content="x"), files.write_file),
        (ToolListDir(path=path), files.list_dir),
    ):
        error = refused(call, ws, tool)
        assert error.code == ErrorCode.PERMISSION_DENIED and error.details["path"] == path
    with open(os.path.join(os.path.dirname(ws.root), "outside.txt")) as file:
        assert file.read() == "secret outside\n"


def test_an_absolute_path_inside_the_workspace_is_taken(ws):
    write(ws, "in.txt", "inside\n")
    assert files.read_file(ws, ToolReadFile(path=os.path.join(ws.root, "in.txt"))).content == "inside\n"


def test_symlinks_that_leave_the_workspace_are_refused(ws):
    os.symlink("/etc", os.path.join(ws.root, "etc"))
    os.symlink("/etc/passwd", os.path.join(ws.root, "passwd"))
    os.symlink("../outside.txt", os.path.join(ws.root, "up"))
    for path in ("passwd", "etc/passwd", "up"):
        assert refused(ToolReadFile(path=path), ws, files.read_file).code in (
            ErrorCode.PERMISSION_DENIED,
            ErrorCode.FAILED_PRECONDITION,
        )
    assert refused(ToolListDir(path="etc"), ws, files.list_dir).code in (
        ErrorCode.PERMISSION_DENIED,
        ErrorCode.FAILED_PRECONDITION,
    )
    with pytest.raises(ToolError):
        files.write_file(ws, ToolWriteFile(path="etc/evil", content="x"))
    assert not os.path.exists("/etc/evil")


def test_writing_over_a_symlink_replaces_the_link_never_its_target(ws):
    outside = os.path.join(os.path.dirname(ws.root), "outside.txt")
    os.symlink(outside, os.path.join(ws.root, "link"))
    files.write_file(ws, ToolWriteFile(path="link", content="new\n"))
    with open(outside) as file:
        assert file.read() == "secret outside\n"
    assert not os.path.islink(os.path.join(ws.root, "link")) and content(ws, "link") == "new\n"


def test_a_symlink_swapped_in_between_calls_is_refused(ws):
    os.mkdir(os.path.join(ws.root, "dir"))
    write(ws, "dir/f.txt", "mine\n")
    assert files.read_file(ws, ToolReadFile(path="dir/f.txt")).content == "mine\n"
    os.rename(os.path.join(ws.root, "dir"), os.path.join(ws.root, "old"))
    os.symlink("/etc", os.path.join(ws.root, "dir"))  # swapped after the first call
    with pytest.raises(ToolError) as caught:
        files.read_file(ws, ToolReadFile(path="dir/passwd"))
    assert caught.value.code in (ErrorCode.PERMISSION_DENIED, ErrorCode.FAILED_PRECONDITION)


def test_a_symlink_staying_inside_is_followed_with_openat2_and_refused_by_the_walk(ws):
    write(ws, "real.txt", "real\n")
    os.symlink("real.txt", os.path.join(ws.root, "alias"))
    if ws.uses_openat2:
        assert files.read_file(ws, ToolReadFile(path="alias")).content == "real\n"
    else:
        assert refused(ToolReadFile(path="alias"), ws, files.read_file).code == ErrorCode.PERMISSION_DENIED


def test_a_nul_byte_in_a_path_is_refused(ws):
    assert refused(ToolReadFile(path="a\0b"), ws, files.read_file).code == ErrorCode.INVALID_ARGUMENT


# write_file


def test_write_file_creates_replaces_and_keeps_no_temporary(ws):
    first = files.write_file(ws, ToolWriteFile(path="w.txt", content="one"))
    assert first.created and first.size == 3
    os.chmod(os.path.join(ws.root, "w.txt"), 0o600)
    second = files.write_file(ws, ToolWriteFile(path="w.txt", content="twö"))
    assert not second.created and second.size == 4 and content(ws, "w.txt") == "twö"
    assert os.stat(os.path.join(ws.root, "w.txt")).st_mode & 0o777 == 0o600
    assert sorted(os.listdir(ws.root)) == ["w.txt"]


def test_write_file_parent_directories_only_when_asked(ws):
    assert (
        refused(ToolWriteFile(path="a/b/c.txt", content="x"), ws, files.write_file).code
        == ErrorCode.NOT_FOUND
    )
    files.write_file(ws, ToolWriteFile(path="a/b/c.txt", content="x", create_dirs=True))
    assert content(ws, "a/b/c.txt") == "x"


def test_write_file_errors(ws):
    os.mkdir(os.path.join(ws.root, "dir"))
    assert (
        refused(ToolWriteFile(path="dir", content="x"), ws, files.write_file).code
        == ErrorCode.FAILED_PRECONDITION
    )
    assert (
        refused(ToolWriteFile(path=".", content="x"), ws, files.write_file).code == ErrorCode.INVALID_ARGUMENT
    )
    write(ws, "file", "x")
    error = refused(ToolWriteFile(path="file/inner", content="x"), ws, files.write_file)
    assert error.code == ErrorCode.FAILED_PRECONDITION


# edit_file


def test_edit_file_replaces_a_string_that_occurs_once(ws):
    write(ws, "e.py", "a = 1\nb = 2\nc = 3\n")
    got = files.edit_file(ws, ToolEditFile(path="e.py", old="b = 2", new="b = 20"))
    assert got.first_line == 2 and content(ws, "e.py") == "a = 1\nb = 20\nc = 3\n"


@pytest.mark.parametrize("text,count", [("x\ny\n", 0), ("b\nb\nb\n", 3)])
def test_edit_file_names_the_count_when_not_exactly_once(ws, text, count):
    write(ws, "e.txt", text)
    error = refused(ToolEditFile(path="e.txt", old="b", new="c"), ws, files.edit_file)
    assert error.code == ErrorCode.FAILED_PRECONDITION and f"occurs {count} times" in error.message
    assert error.details["occurrences"] == count and content(ws, "e.txt") == text


def test_edit_file_replaces_a_line_range(ws):
    write(ws, "l.txt", "1\n2\n3\n4\n")
    files.edit_file(ws, ToolEditFile(path="l.txt", start_line=2, end_line=3, new="two-three"))
    assert content(ws, "l.txt") == "1\ntwo-three\n4\n"
    files.edit_file(ws, ToolEditFile(path="l.txt", start_line=1, new=""))
    assert content(ws, "l.txt") == "two-three\n4\n"


def test_edit_file_errors(ws):
    write(ws, "l.txt", "1\n2\n")
    error = refused(ToolEditFile(path="l.txt", start_line=2, end_line=5, new="x"), ws, files.edit_file)
    assert error.code == ErrorCode.INVALID_ARGUMENT and "has 2 lines" in error.message
    error = refused(ToolEditFile(path="l.txt", start_line=1, old="1", new="x"), ws, files.edit_file)
    assert error.code == ErrorCode.INVALID_ARGUMENT and "not both" in error.message
    error = refused(ToolEditFile(path="l.txt", new="x"), ws, files.edit_file)
    assert error.code == ErrorCode.INVALID_ARGUMENT and "`old`" in error.message
    assert refused(ToolEditFile(path="none", old="a"), ws, files.edit_file).code == ErrorCode.NOT_FOUND
    assert content(ws, "l.txt") == "1\n2\n"


# list_dir, glob


def test_list_dir_names_kinds_and_sizes_and_caps(ws):
    write(ws, "b.txt", "12345")
    os.mkdir(os.path.join(ws.root, "a"))
    os.symlink("/etc", os.path.join(ws.root, "c"))
    got = files.list_dir(ws, ToolListDir())
    assert [(e.name, e.kind, e.size) for e in got.entries] == [
        ("a", "dir", 0),
        ("b.txt", "file", 5),
        ("c", "symlink", 0),
    ]
    capped = files.list_dir(ws, ToolListDir(max_entries=2))
    assert capped.truncated and [e.name for e in capped.entries] == ["a", "b.txt"]
    assert refused(ToolListDir(path="b.txt"), ws, files.list_dir).code == ErrorCode.FAILED_PRECONDITION
    assert refused(ToolListDir(path="none"), ws, files.list_dir).code == ErrorCode.NOT_FOUND


def test_glob_matches_by_component_and_any_depth_without_following_symlinks(ws):
    for path in ("a.py", "src/b.py", "src/deep/c.py", "src/deep/d.txt"):
        write(ws, path, "")
    os.symlink("/etc", os.path.join(ws.root, "src", "etc"))
    assert files.glob(ws, ToolGlob(pattern="*.py")).matches == ["a.py"]
    assert files.glob(ws, ToolGlob(pattern="**/*.py")).matches == ["a.py", "src/b.py", "src/deep/c.py"]
    assert files.glob(ws, ToolGlob(pattern="*.[pt]?*", path="src/deep")).matches == [
        "src/deep/c.py",
        "src/deep/d.txt",
    ]
    assert files.glob(ws, ToolGlob(pattern="**/passwd")).matches == []
    capped = files.glob(ws, ToolGlob(pattern="**", max_matches=2))
    assert capped.truncated and len(capped.matches) == 2
    assert refused(ToolGlob(pattern="*", path="../"), ws, files.glob).code == ErrorCode.PERMISSION_DENIED


# grep


def test_grep_finds_lines_with_context(ws):
    write(ws, "src/a.py", "one\ntwo\nneedle here\nfour\nfive\n")
    write(ws, "src/b.txt", "NEEDLE\n")
    got = files.grep(ws, ToolGrep(pattern="needle", context_lines=1))
    assert [(m.path, m.line, m.text, m.before, m.after) for m in got.matches] == [
        ("src/a.py", 3, "needle here", ["two"], ["four"])
    ]
    assert got.files_searched == 2
    folded = files.grep(ws, ToolGrep(pattern="needle", ignore_case=True, include="*.txt"))
    assert [(m.path, m.line) for m in folded.matches] == [("src/b.txt", 1)]
    single = files.grep(ws, ToolGrep(pattern="f", path="src/a.py"))
    assert [m.line for m in single.matches] == [4, 5]


def test_grep_caps_matches_and_line_length_and_skips_binary_and_big_files(ws):
    write(ws, "many.txt", "hit " + "x" * 100 + "\n" * 1 + "hit\n" * 10)
    with open(os.path.join(ws.root, "bin.dat"), "wb") as file:
        file.write(b"hit\0\n")
    write(ws, "huge.txt", "hit\n" * 100)
    got = files.grep(ws, ToolGrep(pattern="hit", max_matches=3, max_line_length=16, max_file_size=200))
    assert got.truncated and len(got.matches) == 3
    assert got.matches[0].text == "hit " + "x" * 12 + " [line truncated]"
    assert sorted(got.skipped) == ["bin.dat", "huge.txt"]


def test_grep_refuses_a_bad_pattern_and_a_path_outside(ws):
    error = refused(ToolGrep(pattern="("), ws, files.grep)
    assert error.code == ErrorCode.INVALID_ARGUMENT and "not a valid regular expression" in error.message
    assert refused(ToolGrep(pattern="x", path="/etc"), ws, files.grep).code == ErrorCode.PERMISSION_DENIED
