"""Who owns a container or volume (the one ownership rule), what reconcile does with each owner kind, the
mapping of runtime errors to bus codes, and the rules for session volumes."""

from __future__ import annotations

import pytest

from baaaht.bus.errors import BusError
from baaaht.schemas.containers import ContainerSpec, ContainerSummary, Mount, VolumeInfo
from baaaht.schemas.errors import ErrorCode
from baaaht.services.containers import reconcile, session_volumes
from baaaht.services.containers.engine_errors import CODES, bus_error
from baaaht.services.containers.ownership import (
    LABEL_INSTALL,
    LABEL_MANAGED,
    LABEL_OWNER,
    LABEL_ROLE,
    LABEL_SESSION,
    Owner,
    OwnerKind,
    owner_labels,
    owner_of,
)
from baaaht.services.containers.runtime import EngineError, EngineFailure, EngineUnavailable, NotFound

INSTALL = "a" * 32
OURS = {LABEL_MANAGED: "true", LABEL_INSTALL: INSTALL}
FOREIGN = Owner(OwnerKind.FOREIGN)


@pytest.mark.parametrize(
    "labels, owner",
    [
        ({**OURS, LABEL_SESSION: "s1", LABEL_ROLE: "agent"}, Owner(OwnerKind.SESSION, "s1", "agent")),
        ({**OURS, LABEL_OWNER: "session", LABEL_SESSION: "s1"}, Owner(OwnerKind.SESSION, "s1")),
        # Ours without a session label: a session container that lost its session, i.e. an orphan.
        (dict(OURS), Owner(OwnerKind.SESSION, "")),
        ({**OURS, LABEL_OWNER: "pool", LABEL_ROLE: "worker"}, Owner(OwnerKind.POOL, "", "worker")),
        # A pool slot never belongs to a session, whatever a label says.
        ({**OURS, LABEL_OWNER: "pool", LABEL_SESSION: "s1"}, Owner(OwnerKind.POOL)),
        ({**OURS, LABEL_OWNER: "system"}, Owner(OwnerKind.SYSTEM)),
        # A kind this version does not know, or one claiming to be foreign: never touched.
        ({**OURS, LABEL_OWNER: "future-kind", LABEL_SESSION: "s1"}, FOREIGN),
        ({**OURS, LABEL_OWNER: "foreign"}, FOREIGN),
        ({LABEL_MANAGED: "true", LABEL_INSTALL: "b" * 32, LABEL_SESSION: "s1"}, FOREIGN),
        ({LABEL_MANAGED: "false", LABEL_INSTALL: INSTALL, LABEL_SESSION: "s1"}, FOREIGN),
        ({LABEL_INSTALL: INSTALL, LABEL_SESSION: "s1"}, FOREIGN),
        ({}, FOREIGN),
    ],
)
def test_owner_of_reads_the_labels(labels, owner):
    assert owner_of(labels, INSTALL) == owner


@pytest.mark.parametrize("kind", [OwnerKind.SESSION, OwnerKind.POOL, OwnerKind.SYSTEM])
def test_the_labels_written_for_a_kind_read_back_as_that_kind(kind):
    session = "s1" if kind is OwnerKind.SESSION else ""
    owner = owner_of(owner_labels(INSTALL, kind, session, "worker"), INSTALL)
    assert owner == Owner(kind, session, "worker") and owner.ours
    assert owner.follows_session is (kind is OwnerKind.SESSION)
    with pytest.raises(ValueError):
        owner_labels(INSTALL, OwnerKind.FOREIGN)


def summary(labels: dict[str, str], created: float = 0.0) -> ContainerSummary:
    return ContainerSummary(
        id=str(sorted(labels.items())), name="n", image="i", state="running", labels=labels
    )


@pytest.mark.parametrize(
    "labels, verdict, removed",
    [
        ({**OURS, LABEL_SESSION: "s1"}, "missing", True),
        ({**OURS, LABEL_SESSION: "s1"}, "closed", True),
        ({**OURS, LABEL_SESSION: "s1"}, "open", False),
        (dict(OURS), None, True),
        ({**OURS, LABEL_OWNER: "pool"}, None, False),
        ({**OURS, LABEL_OWNER: "system"}, None, False),
        ({**OURS, LABEL_OWNER: "future-kind"}, None, False),
        ({LABEL_MANAGED: "true", LABEL_INSTALL: "b" * 32, LABEL_SESSION: "s1"}, "missing", False),
    ],
)
def test_reconcile_reaps_only_session_containers_whose_session_ended(labels, verdict, removed):
    container = summary(labels)
    verdicts = {"s1": verdict} if verdict else {}
    checked = reconcile.sessions_to_check([container], INSTALL, now=100.0, grace=0)
    assert checked == (set(verdicts) if owner_of(labels, INSTALL).ours else set())
    plan = reconcile.plan([container], INSTALL, verdicts, now=100.0, grace=0)
    assert [r.target for r in plan.remove] == ([container] if removed else [])


def volume(session: str, created: float = 0.0, **labels: str) -> VolumeInfo:
    return VolumeInfo(name=f"v-{session}", labels={**OURS, LABEL_SESSION: session, **labels}, created=created)


def test_session_volumes_outlive_the_close_but_not_the_session():
    gone, closed, alive, young = volume("gone"), volume("closed"), volume("open"), volume("gone2", 95.0)
    pooled = volume("p", **{LABEL_OWNER: "pool"})
    foreign = VolumeInfo(name="other", labels={LABEL_SESSION: "gone"})
    volumes = [gone, closed, alive, young, pooled, foreign]
    assert reconcile.sessions_to_check(volumes, INSTALL, now=100.0, grace=30) == {"gone", "closed", "open"}
    verdicts = {"gone": "missing", "closed": "closed", "open": "open"}
    plan = reconcile.plan(volumes, INSTALL, verdicts, now=100.0, grace=30, ending=reconcile.VOLUME_ENDS)
    assert [r.target for r in plan.remove] == [gone] and "does not exist" in plan.remove[0].reason
    assert (plan.kept, plan.too_young, plan.foreign) == (3, 1, 1)


def test_every_runtime_error_kind_has_its_bus_code():
    assert {kind.__name__: code for kind, code in CODES.items()} == {
        "NotFound": ErrorCode.NOT_FOUND,
        "Conflict": ErrorCode.ALREADY_EXISTS,
        "WrongState": ErrorCode.FAILED_PRECONDITION,
        "Invalid": ErrorCode.INVALID_ARGUMENT,
        "EngineUnavailable": ErrorCode.UNAVAILABLE,
        "EngineTimeout": ErrorCode.TIMEOUT,
        "EngineFailure": ErrorCode.INTERNAL,
    }
    assert set(CODES) == set(EngineError.__subclasses__())
    mapped = bus_error(NotFound("inspect x: no such container", target="x", details={"engine_status": 404}))
    assert (mapped.code, mapped.message, mapped.details) == (
        ErrorCode.NOT_FOUND,
        "inspect x: no such container",
        {"engine_status": 404, "target": "x"},
    )
    assert bus_error(EngineUnavailable("down")).details == {}
    assert bus_error(EngineFailure("odd")).code is ErrorCode.INTERNAL


def test_session_volume_names_never_meet_across_sessions():
    assert session_volumes.volume_name(INSTALL, "s-1", "work") == f"baaaht-{INSTALL[:12]}-s-1-work"
    # The name part has no '-', so session "a-b" with "c" and session "a" with "b-c" cannot collide.
    for bad in ("b-c", "Work", "", "1st", "x" * 33):
        with pytest.raises(BusError) as caught:
            session_volumes.volume_name(INSTALL, "a", bad)
        assert caught.value.code is ErrorCode.INVALID_ARGUMENT and caught.value.details["field"] == "name"


def test_a_spec_keeps_its_own_volumes_apart_and_may_not_mount_another_sessions():
    mine = VolumeInfo(name="mine", labels=session_volumes.volume_labels(INSTALL, "s1", "work"))
    theirs = VolumeInfo(name="theirs", labels=session_volumes.volume_labels(INSTALL, "s2", "work"))
    hosts = VolumeInfo(name="hosts", labels=owner_labels(INSTALL, OwnerKind.SYSTEM))
    shared = VolumeInfo(name="shared", labels={"team": "x"})  # not made by baaaht: the policy's to judge
    known = {v.name: v for v in (mine, theirs, hosts, shared)}
    mounts = [
        Mount(type="volume", source="mine", target="/w"),
        Mount(type="volume", source="shared", target="/s"),
        Mount(type="volume", source="missing", target="/m"),
        Mount(type="volume", target="/anon"),
        Mount(type="tmpfs", target="/tmp"),
    ]
    spec, own = session_volumes.split_own_volumes(
        ContainerSpec(image="i", mounts=mounts), INSTALL, "s1", known.get
    )
    assert own == [mounts[0]] and spec.mounts == mounts[1:]
    # Another session's volume name before it exists, or once taken by hand (unlabelled), is not the
    # policy's to allow: the engine would make it, and that session's volume_create then fails for ever.
    unmade = session_volumes.volume_name(INSTALL, "s2", "later")
    squatted = session_volumes.volume_name(INSTALL, "s2", "work")
    known[squatted] = VolumeInfo(name=squatted, labels={"made": "by hand"})
    for name in ("theirs", "hosts", unmade, squatted):
        refused = ContainerSpec(image="i", mounts=[mounts[4], Mount(type="volume", source=name, target="/x")])
        with pytest.raises(BusError) as caught:
            session_volumes.split_own_volumes(refused, INSTALL, "s1", known.get)
        assert caught.value.code is ErrorCode.PERMISSION_DENIED
        assert caught.value.details["field"] == "spec.mounts[1].source"


def test_an_own_volume_at_tmp_replaces_the_policys_default_tmpfs_there():
    """The policy never sees the session's own volumes, so it adds its tmpfs /tmp for a read-only root;
    the volume asked for at /tmp wins over that default (the engine refuses two mounts at one place)."""
    volume = Mount(type="volume", source="mine", target="/tmp")
    asked = Mount(type="tmpfs", target="/scratch")
    judged = ContainerSpec(image="i", mounts=[asked])
    filled_tmp = Mount(type="tmpfs", target="/tmp", tmpfs_size=256)
    enforced = ContainerSpec(
        image="i", mounts=[Mount(type="tmpfs", target="/scratch", tmpfs_size=256), filled_tmp]
    )
    merged = session_volumes.with_own_volumes(judged, enforced, [volume])
    assert merged.mounts == [enforced.mounts[0], volume]
    elsewhere = Mount(type="volume", source="mine", target="/work")
    assert session_volumes.with_own_volumes(judged, enforced, [elsewhere]).mounts == [
        *enforced.mounts,
        elsewhere,
    ]
