"""The operator's workspace RPCs (container.workspace_list/read/write) on the fake mounts adapter: the
tools' beneath-the-root opens, chunked atomic uploads, the agent user's ownership, session rules."""

from __future__ import annotations

import os
import threading

import pytest

from baaaht.bus.testing import code_of, context, error_of
from baaaht.schemas.errors import ErrorCode
from baaaht.schemas.sessions import SessionState
from baaaht.schemas.workspaces import (
    ContainerWorkspaceList,
    ContainerWorkspaceRead,
    ContainerWorkspaceWrite,
)
from baaaht.services.containers.workspaces import AGENT_GID, AGENT_UID
from tests.container_fakes import FakeSessions, session_info
from tests.test_containers_service import make_service, run_dir  # noqa: F401 - the fixture

UPLOAD = "0123456789abcdef"


@pytest.fixture
def sessions():
    return FakeSessions(session_info("s1"), session_info("s2"))


@pytest.fixture
def service(run_dir, sessions):  # noqa: F811
    return make_service(run_dir, sessions=sessions)


def write(service, path, data, session="s1", **fields):
    request = ContainerWorkspaceWrite(session_id=session, path=path, data=data, **fields)
    return service.workspace_write(request, context())


def read(service, path, session="s1", **fields):
    return service.workspace_read(ContainerWorkspaceRead(session_id=session, path=path, **fields), context())


def listing(service, path=".", session="s1", **fields):
    return service.workspace_list(ContainerWorkspaceList(session_id=session, path=path, **fields), context())


def fs_ids() -> tuple[int, int]:
    """This thread's filesystem uid and gid (the 4th field of Uid: and Gid: in its status)."""
    with open(f"/proc/self/task/{threading.get_native_id()}/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    return int(fields["Uid"].split()[3]), int(fields["Gid"].split()[3])


def test_a_written_file_is_read_and_listed_and_belongs_to_the_agent_user(service):
    made = write(service, "notes/a.txt", b"hello\n", create_dirs=True)
    assert made.created and made.size == 6
    assert read(service, "notes/a.txt").data == b"hello\n"
    root = listing(service)
    assert root.kind == "dir" and [(e.name, e.kind) for e in root.entries] == [("notes", "dir")]
    file = listing(service, "notes/a.txt")
    assert (file.kind, file.size, file.entries) == ("file", 6, [])
    host = service.workspaces.path("s1")
    for made_path in ("notes", "notes/a.txt"):
        info = os.stat(os.path.join(host, made_path))
        assert (info.st_uid, info.st_gid) == (AGENT_UID, AGENT_GID)
    assert fs_ids() == (os.geteuid(), os.getegid())  # the handler thread is itself again
    assert not write(service, "notes/a.txt", b"again").created


def test_reads_go_by_offset_and_length_and_tell_the_size(service):
    write(service, "big", bytes(range(256)) * 40)
    first = read(service, "big", length=4000)
    rest = read(service, "big", offset=4000, length=4000)
    assert (len(first.data), first.size, rest.offset, len(rest.data)) == (4000, 10240, 4000, 4000)
    assert read(service, "big", offset=10240).data == b""


def test_a_chunked_upload_replaces_the_file_only_with_its_last_chunk(service):
    write(service, "f", b"old")
    write(service, "f", b"aaa", upload=UPLOAD, final=False)
    write(service, "f", b"bbXXXX", upload=UPLOAD, offset=3, final=False)
    write(service, "f", b"bbb", upload=UPLOAD, offset=3, final=False)  # sent again: written again
    assert read(service, "f").data == b"old"
    done = write(service, "f", b"cc", upload=UPLOAD, offset=6)
    assert (done.size, done.created) == (8, False)
    assert read(service, "f").data == b"aaabbbcc"
    assert [e.name for e in listing(service).entries] == ["f"]  # no upload left behind


def test_an_upload_out_of_order_or_never_begun_is_refused(service):
    missing = error_of(lambda: write(service, "f", b"x", upload=UPLOAD, offset=5))
    assert missing.code is ErrorCode.FAILED_PRECONDITION and "has not begun" in missing.message
    write(service, "f", b"abc", upload=UPLOAD, final=False)
    gap = error_of(lambda: write(service, "f", b"x", upload=UPLOAD, offset=9))
    assert gap.code is ErrorCode.FAILED_PRECONDITION and "next chunk has offset 3, not 9" in gap.message
    without_id = error_of(lambda: write(service, "f", b"x", offset=3))
    assert without_id.code is ErrorCode.INVALID_ARGUMENT and "names its upload" in without_id.message


@pytest.mark.parametrize("path", ["../outside", "/etc/passwd", "a/../../b"])
def test_paths_outside_the_workspace_are_refused(service, path):
    write(service, "a/inside", b"x", create_dirs=True)
    for call in (
        lambda: read(service, path),
        lambda: write(service, path, b"x"),
        lambda: listing(service, path),
    ):
        assert code_of(call) is ErrorCode.PERMISSION_DENIED


def test_a_symlink_out_of_the_workspace_is_not_followed(service):
    write(service, "x", b"x")
    os.symlink("/etc", os.path.join(service.workspaces.path("s1"), "etc"))
    assert code_of(lambda: read(service, "etc/passwd")) is ErrorCode.PERMISSION_DENIED
    assert code_of(lambda: listing(service, "etc")) is ErrorCode.PERMISSION_DENIED
    assert code_of(lambda: write(service, "etc/evil", b"x")) is ErrorCode.PERMISSION_DENIED
    assert not os.path.exists("/etc/evil")


def test_errors_name_the_problem(service):
    write(service, "d/f", b"x", create_dirs=True)
    assert code_of(lambda: read(service, "nope")) is ErrorCode.NOT_FOUND
    assert code_of(lambda: read(service, "d")) is ErrorCode.FAILED_PRECONDITION
    assert code_of(lambda: write(service, "d", b"x")) is ErrorCode.FAILED_PRECONDITION
    assert code_of(lambda: write(service, "no/such/dir", b"x")) is ErrorCode.NOT_FOUND


def test_each_session_sees_only_its_own_workspace(service):
    write(service, "mine", b"s1's", session="s1")
    write(service, "other", b"s2's", session="s2")
    assert [e.name for e in listing(service, session="s1").entries] == ["mine"]
    assert [e.name for e in listing(service, session="s2").entries] == ["other"]
    assert code_of(lambda: read(service, "mine", session="s2")) is ErrorCode.NOT_FOUND


def test_the_session_must_exist_and_be_open_for_writes(service, sessions):
    assert code_of(lambda: listing(service, session="nope")) is ErrorCode.NOT_FOUND
    assert code_of(lambda: write(service, "f", b"x", session="nope")) is ErrorCode.NOT_FOUND
    nothing_yet = error_of(lambda: listing(service))
    assert nothing_yet.code is ErrorCode.NOT_FOUND and "no workspace yet" in nothing_yet.message
    write(service, "f", b"kept")
    sessions.sessions["s1"].state = SessionState.CLOSED
    refused = error_of(lambda: write(service, "f", b"x"))
    assert refused.code is ErrorCode.FAILED_PRECONDITION and "closed" in refused.message
    assert read(service, "f").data == b"kept"  # a closed session's files may still be read


def test_a_damaged_workspace_is_an_error_naming_its_image(service):
    write(service, "f", b"x")
    service.workspaces.mounts.forget_mounts()
    image = service.workspaces.image_of("s1")
    with open(image, "wb") as file:
        file.write(b"garbage")
    error = error_of(lambda: listing(service))
    assert error.code is ErrorCode.FAILED_PRECONDITION and image in error.message
    assert error_of(lambda: write(service, "f", b"y")).code is ErrorCode.FAILED_PRECONDITION


def test_an_upload_the_agent_swapped_for_a_fifo_is_refused_not_waited_on(service):
    """Between two chunks the agent (owner of the directory) replaces the staged upload by a FIFO
    nobody reads: opening it for writing must not block the container manager's handler thread."""
    write(service, "f", b"abc", upload=UPLOAD, final=False)
    host = service.workspaces.path("s1")
    (staged,) = [name for name in os.listdir(host) if UPLOAD in name]
    os.unlink(os.path.join(host, staged))
    os.mkfifo(os.path.join(host, staged), 0o666)
    os.chown(os.path.join(host, staged), AGENT_UID, AGENT_GID)  # as the agent makes it
    outcome: list = []
    writer = threading.Thread(
        target=lambda: outcome.append(code_of(lambda: write(service, "f", b"d", upload=UPLOAD, offset=3))),
        daemon=True,
    )
    writer.start()
    writer.join(timeout=10)
    if writer.is_alive():  # unblock the handler (a reader appears), then fail
        os.close(os.open(os.path.join(host, staged), os.O_RDONLY | os.O_NONBLOCK))
        writer.join(timeout=10)
        pytest.fail("the chunk's write blocked on the FIFO")
    assert outcome == [ErrorCode.FAILED_PRECONDITION]


SPARSE_SIZE = 64 * 1024 * 1024  # 16 reads of the whole size before holes were skipped
DATA_AT = 40 * 1024 * 1024


def make_sparse(service, name="sparse") -> str:
    """A file of SPARSE_SIZE holding b"data" at DATA_AT, as an agent's `truncate -s` and one write make."""
    write(service, "seed", b"")  # the workspace exists
    host = os.path.join(service.workspaces.path("s1"), name)
    with open(host, "wb") as made:
        made.truncate(SPARSE_SIZE)
        made.seek(DATA_AT)
        made.write(b"data")
    return host


class DirectCtl:
    """Just enough of ctl.common.Ctl for ctl/session_files.py: its calls go to the service directly."""

    def __init__(self, service):
        self.service = service
        self.reads = 0

    def call(self, request):
        self.reads += 1
        return self.service.workspace_read(request, context())


def test_a_read_skips_a_sparse_files_holes_and_stops_at_the_next(service):
    make_sparse(service)
    first = read(service, "sparse")
    assert first.size == SPARSE_SIZE and first.offset <= DATA_AT < first.offset + len(first.data)
    assert first.data[DATA_AT - first.offset :].startswith(b"data") and len(first.data) <= 1024 * 1024
    after = read(service, "sparse", offset=first.offset + len(first.data))
    assert (after.offset, after.data) == (SPARSE_SIZE, b"")  # only a hole to the end


def test_cp_of_a_sparse_file_copies_its_data_and_keeps_its_holes(service, tmp_path):
    from baaaht.ctl.session_files import download

    make_sparse(service)
    ctl = DirectCtl(service)
    local, size = download(ctl, "s1", "sparse", str(tmp_path / "copy"))
    assert size == SPARSE_SIZE and ctl.reads <= 3
    info = os.stat(local)
    assert info.st_size == SPARSE_SIZE and info.st_blocks * 512 <= 1024 * 1024  # its data, not 64 MiB
    with open(local, "rb") as copy:
        copy.seek(DATA_AT)
        assert copy.read(4) == b"data"


def test_files_prints_a_sparse_files_holes_as_zeros_only_up_to_a_limit(service, monkeypatch):
    import io

    import typer

    from baaaht.ctl import session_files

    host = make_sparse(service)
    out = io.BytesIO()
    session_files.print_file(DirectCtl(service), "s1", "sparse", out)
    with open(host, "rb") as original:
        assert out.getvalue() == original.read()
    monkeypatch.setattr(session_files, "PRINTED_HOLES", DATA_AT // 2)
    with pytest.raises(typer.Exit):
        session_files.print_file(DirectCtl(service), "s1", "sparse", io.BytesIO())


def test_files_of_a_file_that_shrinks_while_it_is_printed_prints_what_was_read(service):
    """An agent truncates the file between two reads of `sessions files`: the print ends where the file
    now does (it printed a traceback: a hole of negative length)."""
    import io

    from baaaht.ctl import session_files
    from baaaht.schemas.workspaces import WORKSPACE_CHUNK

    write(service, "seed", b"")
    host = os.path.join(service.workspaces.path("s1"), "shrinks")
    with open(host, "wb") as made:
        made.write(b"x" * (2 * WORKSPACE_CHUNK))

    class ShrinkingCtl(DirectCtl):
        def call(self, request):
            answer = super().call(request)
            os.truncate(host, 10)  # after the first read
            return answer

    out = io.BytesIO()
    session_files.print_file(ShrinkingCtl(service), "s1", "shrinks", out)
    assert out.getvalue() == b"x" * WORKSPACE_CHUNK
