"""Agent identity records and finding a pid's container (pure: files in a temporary directory)."""

from __future__ import annotations

import os
import stat
import threading

from baaaht.common.identity import AgentIdentity, IdentityStore, container_in_cgroup, container_of_pid

CID = "ab" * 32


def identity(container_id: str = CID, session: str = "s1") -> AgentIdentity:
    return AgentIdentity(
        container_id=container_id, session_id=session, role="worker", install_id="i" * 32, issued_at=1.0
    )


def test_put_get_remove_round_trip_with_private_files(tmp_path):
    store = IdentityStore(str(tmp_path))
    store.put(identity())
    assert store.get(CID) == identity()
    mode = os.stat(store.directory / f"{CID}.json").st_mode
    assert stat.S_IMODE(mode) == 0o600 and stat.S_IMODE(os.stat(store.directory).st_mode) == 0o700
    assert [i.container_id for i in store.all()] == [CID]
    assert store.remove(CID) is True and store.get(CID) is None and store.remove(CID) is False


def test_two_writers_of_one_identity_do_not_rename_each_others_file_away(tmp_path):
    store = IdentityStore(str(tmp_path))
    failures: list[BaseException] = []

    def write() -> None:
        try:
            for _ in range(300):
                store.put(identity())
        except OSError as error:
            failures.append(error)

    writers = [threading.Thread(target=write) for _ in range(2)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(30)
    assert failures == [] and sorted(p.name for p in store.directory.iterdir()) == [f"{CID}.json"]


def test_a_name_that_is_not_a_container_id_is_never_a_path(tmp_path):
    store = IdentityStore(str(tmp_path))
    (tmp_path / "secret.json").write_text("{}")
    assert store.get("../secret") is None and store.get("") is None


def test_a_file_that_is_not_an_identity_grants_nothing(tmp_path):
    store = IdentityStore(str(tmp_path))
    store.put(identity())
    (store.directory / f"{'cd' * 32}.json").write_text('{"container_id": "x"}')
    assert [i.container_id for i in store.all()] == [CID]


def test_cgroup_v1_and_v2_name_the_container():
    v1 = f"12:pids:/docker/{CID}\n11:memory:/docker/{CID}\n0::/docker/{CID}\n"
    v2 = f"0::/system.slice/docker-{CID}.scope\n"
    assert container_in_cgroup(v1) == CID and container_in_cgroup(v2) == CID


def test_a_host_process_or_an_ambiguous_cgroup_is_no_container():
    assert container_in_cgroup("0::/user.slice/user-0.slice/session-1.scope\n") is None
    assert container_in_cgroup(f"1:pids:/docker/{CID}\n2:memory:/docker/{'cd' * 32}\n") is None
    assert container_in_cgroup(f"1:pids:/docker/{CID[:-1]}\n") is None


def test_container_of_pid_reads_proc_and_a_gone_pid_is_none(tmp_path):
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "cgroup").write_text(f"0::/docker/{CID}\n")
    assert container_of_pid(42, proc=str(tmp_path)) == CID
    assert container_of_pid(43, proc=str(tmp_path)) is None
    assert container_of_pid(os.getpid()) is None  # this test does not run in a container
