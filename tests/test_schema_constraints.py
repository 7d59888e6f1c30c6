"""One-field rules live in the schemas (msgspec Meta): the bus decoder refuses a bad value before a
handler runs, with INVALID_ARGUMENT and `details.path` naming the field, the same in every service."""

from __future__ import annotations

import msgspec
import pytest

from baaaht.bus.errors import BusError, validation_error
from baaaht.schemas.base import Request, target_of
from baaaht.schemas.containers import (
    ContainerCreate,
    ContainerGet,
    ContainerHealthWait,
    ContainerImageExists,
    ContainerList,
    ContainerLogs,
    ContainerPull,
    ContainerSpec,
    ContainerStart,
    ContainerStatsStream,
    ContainerStop,
    ContainerVolumeCreate,
    Healthcheck,
    Mount,
    PortBinding,
    Resources,
)
from baaaht.schemas.errors import ErrorCode
from baaaht.schemas.sessions import SessionAttachContainer, SessionGet, SessionList, SessionMessages
from baaaht.services.containers.service import ContainerService
from baaaht.services.containers.validation import validate_spec
from baaaht.services.sessions.service import SessionService

BAD_IDS = ["", "a/b", "../info", ".", "..", "-rf", "has space", "tab\there", "nul\0", "é", "x" * 129]
GOOD_IDS = ["s1", "0123456789abcdef0123456789abcdef", "agent-1.a_b", "x" * 128]


def decoder_of(request: Request) -> msgspec.msgpack.Decoder:
    """The decoder the service runner builds for the method serving this request."""
    target = target_of(type(request))
    service = SessionService if target.startswith("session.") else ContainerService
    return msgspec.msgpack.Decoder(service.rpcs()[target].request_type)


def refusal(request: Request) -> BusError:
    """What the service runner answers to this request's body: the same decoder, the same error."""
    body = msgspec.msgpack.encode(request)  # encoding does not check constraints; decoding does
    with pytest.raises(msgspec.ValidationError) as caught:
        decoder_of(request).decode(body)
    return validation_error(target_of(type(request)), caught.value)


def accepted(request: Request) -> Request:
    return decoder_of(request).decode(msgspec.msgpack.encode(request))


SESSION_ID_FIELDS = [
    lambda v: SessionGet(session_id=v),
    lambda v: SessionMessages(session_id=v),
    lambda v: ContainerCreate(spec=ContainerSpec(image="img:1"), session_id=v),
    lambda v: ContainerVolumeCreate(session_id=v),
]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_sessions_and_containers_refuse_the_same_session_ids_the_same_way(bad):
    errors = [refusal(make(bad)) for make in SESSION_ID_FIELDS]
    for error in errors:
        assert error.code is ErrorCode.INVALID_ARGUMENT and error.details == {"path": "$.session_id"}
    problems = {error.message.split(": ", 1)[1] for error in errors}
    assert len(problems) == 1, problems


@pytest.mark.parametrize("good", GOOD_IDS)
def test_every_service_accepts_the_same_ids(good):
    for make in SESSION_ID_FIELDS:
        assert accepted(make(good)).session_id == good
    assert accepted(ContainerStart(id=good)).id == good
    assert accepted(SessionAttachContainer(session_id=good, container_id=good)).container_id == good


@pytest.mark.parametrize("bad", BAD_IDS)
def test_container_refs_and_container_ids_follow_the_same_rule(bad):
    assert refusal(ContainerStart(id=bad)).details == {"path": "$.id"}
    assert refusal(SessionAttachContainer(session_id="s1", container_id=bad)).details == {
        "path": "$.container_id"
    }


@pytest.mark.parametrize("bad", ["a/b", "..", "-x"])
def test_session_filters_may_be_empty_but_not_bad(bad):
    assert accepted(ContainerList()).session_id == ""
    assert refusal(ContainerList(session_id=bad)).details == {"path": "$.session_id"}


def create(**spec) -> ContainerCreate:
    return ContainerCreate(spec=ContainerSpec(**{"image": "img:1", **spec}), session_id="s1")


@pytest.mark.parametrize(
    "request_, path",
    [
        (create(image=""), "$.spec.image"),
        (create(image="has space"), "$.spec.image"),
        (create(image="../../containers"), "$.spec.image"),  # an engine URL path
        (create(image="a/./b"), "$.spec.image"),
        (ContainerPull(image="../x"), "$.image"),
        (create(name="-bad"), "$.spec.name"),
        (create(name="a/b"), "$.spec.name"),
        (ContainerCreate(spec=ContainerSpec(image="i"), session_id="s1", role="Agent!"), "$.role"),
        (ContainerVolumeCreate(session_id="s1", name="a-b"), "$.name"),
        (create(ports=[PortBinding(container_port=0)]), "$.spec.ports[0].container_port"),
        (create(ports=[PortBinding(container_port=1, host_port=65536)]), "$.spec.ports[0].host_port"),
        (create(resources=Resources(cpus=-1)), "$.spec.resources.cpus"),
        (create(resources=Resources(pids=-1)), "$.spec.resources.pids"),
        (create(restart_max_retries=-1), "$.spec.restart_max_retries"),
        (create(healthcheck=Healthcheck(test=["CMD", "true"], retries=0)), "$.spec.healthcheck.retries"),
        (create(healthcheck=Healthcheck(test=["CMD", "true"], interval=0)), "$.spec.healthcheck.interval"),
        (
            create(healthcheck=Healthcheck(test=["CMD", "true"], start_period=-1)),
            "$.spec.healthcheck.start_period",
        ),
        (ContainerStop(id="c", timeout=-1), "$.timeout"),
        (ContainerLogs(id="c", tail=-2), "$.tail"),
        (ContainerLogs(id="c", since=-1), "$.since"),
        (ContainerStatsStream(id="c", interval=0.5), "$.interval"),
        (ContainerHealthWait(id="c", retries=0), "$.retries"),
        (ContainerHealthWait(id="c", interval=0), "$.interval"),
        (SessionList(limit=0), "$.limit"),
        (SessionList(limit=1001), "$.limit"),
        (SessionList(cursor=-1), "$.cursor"),
        (SessionMessages(session_id="s1", limit=0), "$.limit"),
        (SessionMessages(session_id="s1", limit=1001), "$.limit"),
    ],
)
def test_one_field_rules_are_refused_at_decode_naming_the_field(request_, path):
    error = refusal(request_)
    assert error.code is ErrorCode.INVALID_ARGUMENT and error.details == {"path": path}
    assert path in error.message


def test_the_edges_of_each_range_are_accepted():
    assert accepted(create(ports=[PortBinding(container_port=65535, host_port=0)]))
    assert accepted(ContainerLogs(id="c", tail=-1)).tail == -1
    assert accepted(ContainerStatsStream(id="c", interval=1)).interval == 1
    assert accepted(SessionList(limit=1000, cursor=0)).limit == 1000
    assert accepted(create(image="registry.local:5000/team/img:1.2", name="web.1")).spec.name == "web.1"


@pytest.mark.parametrize(
    "request_, path",
    [
        (ContainerGet(id="../containers"), "$.id"),
        (ContainerStop(id="x/../../info"), "$.id"),
        (ContainerImageExists(image="../../containers"), "$.image"),
        (ContainerPull(image="a/../../../info"), "$.image"),
        (create(mounts=[Mount(type="volume", source="../info", target="/x")]), "$.spec.mounts[0].source"),
    ],
)
def test_a_reference_that_would_reach_another_engine_endpoint_is_refused(request_, path):
    # Each goes into the engine API's URL path: against Docker, `../containers` inspects the list of
    # every container on the host and `../info` answers with the engine's own description.
    if path.startswith("$.spec.mounts"):  # whether a source is a volume name depends on the mount's type
        with pytest.raises(BusError) as caught:
            validate_spec(request_.spec)
        assert caught.value.code is ErrorCode.INVALID_ARGUMENT and caught.value.details["field"] == path[2:]
    else:
        assert refusal(request_).details == {"path": path}
