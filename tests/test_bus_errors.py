"""The path an INVALID_ARGUMENT names, for every shape of request body msgspec refuses."""

from __future__ import annotations

import msgspec
import pytest

from baaaht.bus.errors import validation_error
from baaaht.schemas.containers import ContainerCreate
from baaaht.schemas.errors import ErrorCode

GOOD_SPEC = {"image": "busybox:1.36"}
GOOD_MOUNT = {"type": "bind", "source": "/srv", "target": "/srv"}


def refusal(body: dict):
    with pytest.raises(msgspec.DecodeError) as caught:
        msgspec.msgpack.Decoder(ContainerCreate).decode(msgspec.msgpack.encode(body))
    return validation_error("container.create", caught.value)


@pytest.mark.parametrize(
    "body, path",
    [
        ({"spec": GOOD_SPEC}, "$.session_id"),  # a missing field at the top
        ({"session_id": "s1"}, "$.spec"),
        ({"spec": {}, "session_id": "s1"}, "$.spec.image"),  # a missing nested field names itself
        ({"spec": {"image": 7}, "session_id": "s1"}, "$.spec.image"),  # a wrong type
        (
            {
                "spec": {**GOOD_SPEC, "mounts": [GOOD_MOUNT, {"type": "bind", "source": "/a"}]},
                "session_id": "s1",
            },
            "$.spec.mounts[1].target",
        ),  # a missing field in an array element
        ({"spec": {**GOOD_SPEC, "mounts": [GOOD_MOUNT, 5]}, "session_id": "s1"}, "$.spec.mounts[1]"),
        ({"spec": {**GOOD_SPEC, "env": {"A": 1}}, "session_id": "s1"}, "$.spec.env[...]"),  # a dict value
        # The caller's data quoted in the problem cannot move the path.
        (
            {
                "spec": {**GOOD_SPEC, "mounts": [{**GOOD_MOUNT, "type": "x - at `$.evil`"}]},
                "session_id": "s1",
            },
            "$.spec.mounts[0].type",
        ),
    ],
)
def test_the_path_names_the_failing_field(body, path):
    error = refusal(body)
    assert error.code is ErrorCode.INVALID_ARGUMENT
    assert error.details == {"path": path}
    assert error.message.startswith("invalid container.create request: ")


def test_a_body_that_is_not_msgpack_has_no_path():
    with pytest.raises(msgspec.DecodeError) as caught:
        msgspec.msgpack.Decoder(ContainerCreate).decode(b"\xc1")
    error = validation_error("container.create", caught.value)
    assert error.code is ErrorCode.INVALID_ARGUMENT and error.details == {}
