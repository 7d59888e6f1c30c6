"""Workspaces on the fake mounts adapter: layout, idempotence, remount, removal, bad images."""

from __future__ import annotations

import os
import threading

import pytest

from baaaht.services.containers import reconcile
from baaaht.services.containers.workspaces import WorkspaceError, Workspaces
from tests.workspace_fakes import FakeWorkspaceMounts

SIZE = 64 * 1024 * 1024


@pytest.fixture
def mounts(tmp_path):
    return FakeWorkspaceMounts(str(tmp_path / "aside"))


@pytest.fixture
def workspaces(tmp_path, mounts):
    return Workspaces(str(tmp_path), SIZE, mounts)


def test_ensure_makes_and_mounts_the_image_once(workspaces, mounts, tmp_path):
    path = workspaces.ensure("s1")
    assert path == str(tmp_path / "workspaces" / "s1")
    image = str(tmp_path / "workspace-images" / "s1.img")
    assert mounts.mounted == {path: image}
    assert workspaces.ensure("s1") == path
    assert mounts.made == [os.path.join(os.path.dirname(image), mounts.made[0].rsplit("/", 1)[1])]
    assert len(mounts.made) == 1 and os.listdir(tmp_path / "workspace-images") == ["s1.img"]
    assert workspaces.path("s1") == path


def test_path_is_none_until_mounted(workspaces):
    assert workspaces.path("s1") is None
    workspaces.ensure("s1")
    workspaces.remove("s1")
    assert workspaces.path("s1") is None


def test_sessions_are_separate(workspaces, mounts):
    a, b = workspaces.ensure("a"), workspaces.ensure("b")
    assert a != b and mounts.mounted[a] != mounts.mounted[b]
    with open(os.path.join(a, "note"), "w") as file:
        file.write("a's")
    assert os.listdir(b) == []


def test_a_session_id_like_an_image_name_names_its_own_workspace(workspaces, mounts):
    plain, dotted = workspaces.ensure("a"), workspaces.ensure("a.img")
    assert plain != dotted and mounts.mounted[plain] != mounts.mounted[dotted]
    assert workspaces.sessions() == ["a", "a.img"]


def test_remove_unmounts_and_deletes_the_image(workspaces, mounts, tmp_path):
    path = workspaces.ensure("s1")
    with open(os.path.join(path, "note"), "w") as file:
        file.write("kept until removed")
    workspaces.remove("s1")
    assert mounts.mounted == {}
    assert not os.path.exists(path)
    assert not os.path.exists(tmp_path / "workspace-images" / "s1.img")
    workspaces.remove("s1")  # idempotent
    assert os.listdir(workspaces.ensure("s1")) == []  # a new one starts empty


def test_remove_never_deletes_files_beneath_a_mount_point_it_could_not_unmount(workspaces, mounts):
    path = workspaces.ensure("s1")
    with open(os.path.join(path, "note"), "w") as file:
        file.write("precious")

    def refuse(target):
        raise WorkspaceError(f"could not unmount the workspace {target}: busy", target)

    mounts.unmount = refuse
    with pytest.raises(WorkspaceError, match="busy"):
        workspaces.remove("s1")
    with open(os.path.join(path, "note")) as file:
        assert file.read() == "precious"
    assert os.path.exists(workspaces.image_of("s1"))


def test_mount_existing_mounts_every_image_again_with_its_files(workspaces, mounts, tmp_path):
    for session in ("a", "b"):
        with open(os.path.join(workspaces.ensure(session), "note"), "w") as file:
            file.write(session)
    mounts.forget_mounts()  # the host restarted
    assert workspaces.path("a") is None
    fresh = Workspaces(str(tmp_path), SIZE, mounts)
    assert fresh.mount_existing() == []
    for session in ("a", "b"):
        with open(os.path.join(fresh.path(session), "note")) as file:
            assert file.read() == session
    assert len(mounts.made) == 2  # mounted again, never made again


def test_mount_existing_deletes_half_made_images(workspaces, tmp_path):
    workspaces.ensure("a")
    leftover = tmp_path / "workspace-images" / "b.img.123.456.new"
    leftover.write_bytes(b"half")
    workspaces.mount_existing()
    assert sorted(os.listdir(tmp_path / "workspace-images")) == ["a.img"]


def test_a_damaged_image_is_an_error_naming_it_never_a_new_empty_workspace(workspaces, mounts, tmp_path):
    workspaces.ensure("s1")
    mounts.forget_mounts()
    image = tmp_path / "workspace-images" / "s1.img"
    image.write_bytes(b"garbage")
    with pytest.raises(WorkspaceError) as raised:
        workspaces.ensure("s1")
    assert str(image) in raised.value.message and raised.value.path == str(image)
    assert image.read_bytes() == b"garbage" and workspaces.path("s1") is None
    assert len(mounts.made) == 1
    failures = workspaces.mount_existing()
    assert [failure.path for failure in failures] == [str(image)]


def test_a_failed_mount_leaves_the_mount_point_closed(workspaces, mounts, tmp_path):
    workspaces.ensure("s1")
    mounts.forget_mounts()
    mounts.fail_mount.add(workspaces.image_of("s1"))
    with pytest.raises(WorkspaceError, match="could not mount"):
        workspaces.ensure("s1")
    assert os.stat(workspaces.target_of("s1")).st_mode & 0o777 == 0


def test_a_failed_make_leaves_no_image(workspaces, mounts, tmp_path):
    def broken(image, size, uid, gid):
        open(image, "wb").close()
        raise WorkspaceError(f"could not make the workspace image {image}: no mkfs", image)

    mounts.make_image = broken
    with pytest.raises(WorkspaceError, match="no mkfs"):
        workspaces.ensure("s1")
    assert os.listdir(tmp_path / "workspace-images") == []


def test_concurrent_ensures_make_one_workspace(workspaces, mounts):
    paths: list[str] = []
    threads = [threading.Thread(target=lambda: paths.append(workspaces.ensure("s1"))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert len(set(paths)) == 1 and len(paths) == 8
    assert len(mounts.made) == 1


@pytest.mark.parametrize("bad", ["", "../x", "a/b", ".hidden", "x" * 129])
def test_a_bad_session_id_is_refused(workspaces, bad):
    with pytest.raises(ValueError, match="not a session id"):
        workspaces.ensure(bad)


def test_images_are_judged_by_reconcile_as_their_sessions(workspaces):
    workspaces.ensure("gone")
    workspaces.ensure("open")
    images = workspaces.images("install1")
    verdicts = {"gone": "missing", "open": "open"}
    now = max(image.created for image in images) + 100
    assert reconcile.sessions_to_check(images, "install1", now, 30) == {"gone", "open"}
    plan = reconcile.plan(images, "install1", verdicts, now, 30, reconcile.VOLUME_ENDS)
    assert [removal.target.session_id for removal in plan.remove] == ["gone"]
    young = reconcile.plan(images, "install1", verdicts, now - 100, 30, reconcile.VOLUME_ENDS)
    assert young.remove == [] and young.too_young == 2
