"""Workspaces end to end: the real container manager process on real loop mounts, `baaaht-ctl sessions
files` and `cp` through the real app, and an agent-image container that mounts the workspace."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from baaaht.bus.testing import code_of, wait_for
from baaaht.schemas.errors import ErrorCode
from baaaht.schemas.sessions import SessionClose, SessionDelete
from baaaht.schemas.workspaces import WORKSPACE_CHUNK, ContainerWorkspaceList
from tests import container_support, ctl_runner
from tests.test_containers_bus import SETTINGS, Orchestrator
from tests.test_workspaces_loop import mounted_below, wait_loop_devices_freed

pytestmark = [
    pytest.mark.docker,
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/loop-control"), reason="needs root"),
]

docker_client, test_label = container_support.docker_client, container_support.test_label
SIZE = 24 * 1024 * 1024


@pytest.fixture
def orchestrator(make_host, docker_client):
    host = make_host({**SETTINGS, "workspace": {"size": SIZE}})
    made = Orchestrator(host, docker_client)
    yield made
    made.cleanup()
    for target in mounted_below(str(host.data_dir)):
        subprocess.run(["umount", target], timeout=30, check=False)
    wait_loop_devices_freed(str(host.data_dir))


def ctl(orchestrator, *args: str, expect: int | None = 0):
    return ctl_runner.invoke(orchestrator.host, "sessions", *args, expect=expect)


def workspace_of(orchestrator, session: str) -> str:
    return str(orchestrator.host.data_dir / "workspaces" / session)


def test_cp_in_and_out_in_chunks_and_files_lists_and_shows(orchestrator, tmp_path):
    session, other = orchestrator.session(), orchestrator.session()
    big = os.urandom(2 * WORKSPACE_CHUNK + 12345)  # three chunks
    (tmp_path / "big.bin").write_bytes(big)
    (tmp_path / "notes.txt").write_text("hello workspace\n")
    copied = json.loads(
        ctl(orchestrator, "cp", str(tmp_path / "big.bin"), f"{session}:data/", "--json").stdout
    )
    assert copied == {
        "source": str(tmp_path / "big.bin"),
        "destination": f"{session}:data/big.bin",
        "size": len(big),
    }
    ctl(orchestrator, "cp", str(tmp_path / "notes.txt"), f"{session}:notes.txt")

    table = ctl(orchestrator, "files", session).stdout.splitlines()
    assert table[0].split() == ["NAME", "KIND", "SIZE"]
    assert [line.split()[:2] for line in table[1:]] == [["data", "dir"], ["notes.txt", "file"]]
    listed = json.loads(ctl(orchestrator, "files", session, "data", "--json").stdout)
    assert [(e["name"], e["size"]) for e in listed["entries"]] == [("big.bin", len(big))]
    assert ctl(orchestrator, "files", session, "notes.txt").stdout == "hello workspace\n"

    ctl(orchestrator, "cp", f"{session}:data/big.bin", str(tmp_path / "back.bin"))
    assert (tmp_path / "back.bin").read_bytes() == big
    out = tmp_path / "out"
    out.mkdir()
    ctl(orchestrator, "cp", f"{session}:notes.txt", str(out))
    assert (out / "notes.txt").read_text() == "hello workspace\n"

    # The other session's workspace is its own: none of these files are in it.
    ctl(orchestrator, "cp", str(tmp_path / "notes.txt"), f"{other}:mine.txt")
    assert [e["name"] for e in json.loads(ctl(orchestrator, "files", other, "--json").stdout)["entries"]] == [
        "mine.txt"
    ]
    assert "does not exist" in ctl(orchestrator, "files", other, "notes.txt", expect=1).stderr


def test_clear_errors(orchestrator, tmp_path):
    session = orchestrator.session()
    assert "no workspace yet" in ctl(orchestrator, "files", session, expect=1).stderr
    both = ctl(orchestrator, "cp", str(tmp_path / "a"), str(tmp_path / "b"), expect=1)
    assert "give one SESSION:PATH and one local path" in both.stderr
    missing = ctl(orchestrator, "cp", str(tmp_path / "nope"), f"{session}:x", expect=1)
    assert "cannot read" in missing.stderr and "nope" in missing.stderr
    (tmp_path / "a").write_text("a")
    outside = ctl(orchestrator, "cp", str(tmp_path / "a"), f"{session}:../escape", expect=1)
    assert "PERMISSION_DENIED" in outside.stderr and "`..`" in outside.stderr
    unknown = ctl(orchestrator, "cp", str(tmp_path / "a"), "nosuchsession:x", expect=1)
    assert "NOT_FOUND" in unknown.stderr and "nosuchsession" in unknown.stderr


def test_a_full_workspace_refuses_the_copy_and_stays_usable(orchestrator, tmp_path):
    session = orchestrator.session()
    (tmp_path / "huge").write_bytes(b"\0" * (SIZE + WORKSPACE_CHUNK))
    full = ctl(orchestrator, "cp", str(tmp_path / "huge"), f"{session}:huge", expect=1)
    assert "RESOURCE_EXHAUSTED" in full.stderr and "no space left" in full.stderr
    (tmp_path / "small").write_text("fits")
    ctl(orchestrator, "cp", str(tmp_path / "small"), f"{session}:small")
    entries = json.loads(ctl(orchestrator, "files", session, "--json").stdout)["entries"]
    assert [e["name"] for e in entries] == ["small"]  # the failed upload left nothing behind


def test_an_agent_image_container_sees_the_files_and_writes_as_the_agent_user(
    orchestrator, agent_image, docker_client, test_label, tmp_path
):
    session = orchestrator.session()
    (tmp_path / "in.txt").write_text("from the operator\n")
    ctl(orchestrator, "cp", str(tmp_path / "in.txt"), f"{session}:in.txt")
    container = docker_client.containers.run(
        agent_image,
        ["sh", "-c", "cat /workspace/in.txt && id -u > /workspace/out.txt && mkdir /workspace/made"],
        entrypoint=[],
        user="1000:1000",
        network_mode="none",
        volumes={workspace_of(orchestrator, session): {"bind": "/workspace", "mode": "rw"}},
        labels=test_label,
        detach=True,
    )
    assert container.wait(timeout=60)["StatusCode"] == 0, container.logs()
    assert container.logs() == b"from the operator\n"
    assert ctl(orchestrator, "files", session, "out.txt").stdout == "1000\n"
    kinds = {
        e["name"]: e["kind"]
        for e in json.loads(ctl(orchestrator, "files", session, "--json").stdout)["entries"]
    }
    assert kinds == {"in.txt": "file", "out.txt": "file", "made": "dir"}
    # What the operator copies in is the agent's to change.
    (tmp_path / "made.txt").write_text("x")
    ctl(orchestrator, "cp", str(tmp_path / "made.txt"), f"{session}:made/by-operator.txt")
    info = os.stat(os.path.join(workspace_of(orchestrator, session), "made", "by-operator.txt"))
    assert (info.st_uid, info.st_gid) == (1000, 1000)


def test_a_deleted_sessions_workspace_is_unmounted_and_removed(orchestrator, tmp_path):
    session, kept = orchestrator.session(), orchestrator.session()
    (tmp_path / "f").write_text("f")
    for each in (session, kept):
        ctl(orchestrator, "cp", str(tmp_path / "f"), f"{each}:f")
    image = orchestrator.host.data_dir / "workspace-images" / f"{session}.img"
    assert image.exists() and os.path.ismount(workspace_of(orchestrator, session))
    orchestrator.bus.call(SessionClose(session_id=session, wait=True), timeout=60)
    orchestrator.bus.call(SessionDelete(session_id=session))
    wait_for(lambda: not image.exists(), 30, what="the deleted session's workspace image to go")
    assert not os.path.exists(workspace_of(orchestrator, session))
    assert [t for t in mounted_below(str(orchestrator.host.data_dir))] == [workspace_of(orchestrator, kept)]
    wait_loop_devices_freed(str(orchestrator.host.data_dir), keep=1)


def test_a_restarted_container_manager_mounts_the_workspaces_again(orchestrator, tmp_path):
    session = orchestrator.session()
    (tmp_path / "f").write_text("survives a host restart\n")
    ctl(orchestrator, "cp", str(tmp_path / "f"), f"{session}:f")
    host = orchestrator.host
    host.kill("baaaht.services.containers")
    subprocess.run(["umount", workspace_of(orchestrator, session)], timeout=30, check=True)  # the reboot
    host.start_service("baaaht.services.containers", service="container")
    assert os.path.ismount(workspace_of(orchestrator, session))
    assert ctl(orchestrator, "files", session, "f").stdout == "survives a host restart\n"
    gone = code_of(lambda: orchestrator.bus.call(ContainerWorkspaceList(session_id="nosuch")))
    assert gone is ErrorCode.NOT_FOUND
