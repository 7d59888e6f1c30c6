"""The credential service's RPCs, background work and in-process SecretSource, on a real store."""

from __future__ import annotations

import base64
import re

import msgspec
import pytest

from baaaht.bus.authorize import AGENT, CALL, OPERATOR, SERVICE, authorize
from baaaht.bus.testing import ServiceHarness, agent_caller, code_of, context, error_of
from baaaht.common.config import ConfigError, load_config
from baaaht.schemas.base import Empty
from baaaht.schemas.config import Config, CredentialsConfig
from baaaht.schemas.credentials import (
    CredentialChanged,
    CredentialDelete,
    CredentialDescribe,
    CredentialExpired,
    CredentialList,
    CredentialMasterRotated,
    CredentialPut,
    CredentialRotate,
    CredentialRotateMaster,
)
from baaaht.schemas.egress import CredentialUsage
from baaaht.schemas.errors import ErrorCode
from baaaht.services.credentials.master import KeyFile, Passphrase
from baaaht.services.credentials.service import CredentialService, master_source
from baaaht.services.credentials.source import SecretExpired, SecretNotFound, SecretSource
from baaaht.services.credentials.store import CredentialStore
from tests.session_doubles import FakeClock

VALUE = b"sk-test-service-5f2c9a7e"


@pytest.fixture
def clock():
    return FakeClock(1_800_000_000.0)


@pytest.fixture
def harness(tmp_path, clock):
    store = CredentialStore.open(str(tmp_path / "data"), KeyFile(str(tmp_path / "keys" / "m.key")), clock)
    config = Config(credentials=CredentialsConfig(grace_period=600.0, sweep_interval=3600.0))
    harness = ServiceHarness(CredentialService, store, config, clock=clock)
    yield harness
    store.close()


def test_put_describe_list_rotate_delete_and_no_answer_holds_the_value(harness, clock):
    answers = [harness.call(CredentialPut(name="openai", kind="bearer_token", value=VALUE, description="d"))]
    answers.append(harness.call(CredentialDescribe(name="openai")))
    clock.now += 1
    rotated = harness.call(CredentialRotate(name="openai", value=b"second-" + VALUE))
    answers.append(rotated)
    assert rotated.version == 2 and rotated.versions[1].erase_at == clock.now + 600.0  # the configured grace
    assert harness.call(CredentialRotate(name="openai", value=b"third", grace=5.0)).versions[1].erase_at == (
        clock.now + 5.0
    )
    page = harness.call(CredentialList())
    answers.append(page)
    assert [c.name for c in page.credentials] == ["openai"]
    answers.append(harness.call(CredentialRotateMaster()))
    assert answers[-1].rewrapped == 3 and answers[-1].source == "key_file"
    assert harness.call(CredentialDelete(name="openai")) == Empty()
    changes = [(e.name, e.change, e.version) for e in harness.bus.events(CredentialChanged)]
    assert changes == [
        ("openai", "added", 1),
        ("openai", "rotated", 2),
        ("openai", "rotated", 3),
        ("openai", "deleted", 0),
    ]
    assert [e.rewrapped for e in harness.bus.events(CredentialMasterRotated)] == [3]
    answers += [published.event for published in harness.bus.published]
    assert code_of(lambda: harness.call(CredentialDescribe(name="openai"))) is ErrorCode.NOT_FOUND
    wire = b"".join(msgspec.msgpack.encode(answer) + msgspec.json.encode(answer) for answer in answers)
    for leaked in (VALUE, base64.b64encode(VALUE), b"third"):
        assert leaked not in wire


def test_the_service_is_the_secret_source_of_its_process(harness, clock):
    source: SecretSource = harness.service
    harness.call(CredentialPut(name="a", kind="basic", value=b"user:pass", expires_at=clock.now + 10))
    secret = source.secret_for("a")
    assert (secret.kind, secret.value, secret.version) == ("basic", b"user:pass", 1)
    clock.now += 3
    source.mark_used("a")
    assert harness.call(CredentialDescribe(name="a")).last_used_at == clock.now
    with pytest.raises(SecretNotFound):
        source.secret_for("b")
    clock.now += 7
    with pytest.raises(SecretExpired):
        source.secret_for("a")
    with pytest.raises(SecretExpired):
        source.secret_for("a")
    assert [(e.name, e.expires_at) for e in harness.bus.events(CredentialExpired)] == [("a", clock.now)]


def test_the_sweep_announces_each_expiry_once_and_erases_retired_versions(harness, clock):
    harness.call(CredentialPut(name="a", kind="api_key", value=VALUE, expires_at=clock.now + 5))
    harness.call(CredentialRotate(name="a", value=b"second", grace=1.0))
    harness.service.sweep()
    assert harness.bus.events(CredentialExpired) == []
    clock.now += 5
    harness.service.sweep()
    harness.service.sweep()
    [expired] = harness.bus.events(CredentialExpired)
    assert expired.name == "a" and VALUE not in msgspec.msgpack.encode(expired)
    assert [v.version for v in harness.call(CredentialDescribe(name="a")).versions] == [2]


@pytest.mark.parametrize(
    "kind, value, problem",
    [
        ("basic", b"no-colon", "user:password"),
        ("api_key", b"line\nbreak", "control character"),
        ("bearer_token", b"nul\x00", "control character"),
    ],
)
def test_values_that_could_not_be_injected_are_refused_without_echoing_them(harness, kind, value, problem):
    error = error_of(lambda: harness.call(CredentialPut(name="a", kind=kind, value=value)))
    assert error.code is ErrorCode.INVALID_ARGUMENT and problem in error.message
    assert value.decode() not in error.message + repr(error.details)
    assert code_of(lambda: harness.call(CredentialDescribe(name="a"))) is ErrorCode.NOT_FOUND


def test_a_taken_name_is_already_exists(harness):
    harness.call(CredentialPut(name="a", kind="api_key", value=VALUE))
    error = error_of(lambda: harness.call(CredentialPut(name="a", kind="api_key", value=b"other")))
    assert error.code is ErrorCode.ALREADY_EXISTS and "rotate" in error.message
    assert error.details == {"name": "a"}


@pytest.mark.parametrize(
    "request_",
    [
        CredentialDescribe(name="nope"),
        CredentialRotate(name="nope", value=b"x"),
        CredentialDelete(name="nope"),
    ],
)
def test_a_missing_name_is_not_found_naming_it(harness, request_):
    # The store raises its own error; the service maps it to the code (issue 9.8).
    error = error_of(lambda: harness.call(request_))
    assert error.code is ErrorCode.NOT_FOUND and error.message == "no credential named 'nope'"
    assert error.details == {"name": "nope"}


@pytest.mark.parametrize("role", ["agent", "assistant", "worker", "unidentified"])
def test_no_agent_caller_gets_anything_done(harness, role):
    harness.call(CredentialPut(name="a", kind="api_key", value=VALUE))
    requests = [
        CredentialPut(name="b", kind="api_key", value=VALUE),
        CredentialList(),
        CredentialDescribe(name="a"),
        CredentialRotate(name="a", value=b"other"),
        CredentialDelete(name="a"),
        CredentialRotateMaster(),
        CredentialUsage(),
    ]
    assert {type(r) for r in requests} == {s.request_type for s in CredentialService.rpcs().values()}
    agent = context(caller=agent_caller("s1", role))
    for request in requests:
        error = error_of(lambda request=request: harness.call(request, agent))
        assert error.code is ErrorCode.PERMISSION_DENIED and f"{role} callers may not" in error.message
    info = harness.call(CredentialDescribe(name="a"))
    assert info.version == 1 and [i.name for i in harness.call(CredentialList()).credentials] == ["a"]


def test_only_the_operator_and_host_services_may_call_credential_methods():
    for target in ("credential.put", "credential.describe", "credential.rotate_master"):
        assert authorize(OPERATOR, CALL, target) is None
        assert authorize(SERVICE, CALL, target) is None
        assert authorize(AGENT, CALL, target) is not None


def test_the_master_source_follows_the_config(tmp_path):
    assert isinstance(master_source(CredentialsConfig(master_key_file="/k")), KeyFile)
    assert isinstance(master_source(CredentialsConfig(passphrase_file=str(tmp_path / "p"))), Passphrase)
    assert master_source(CredentialsConfig(passphrase_env="X")).where == "environment variable X"


@pytest.mark.parametrize(
    "flags, problem",
    [
        (
            {"data_dir": "/srv/b", "credentials.master_key_file": "/srv/b/keys/master.key"},
            "credentials.master_key_file: '/srv/b/keys/master.key' is inside data_dir /srv/b",
        ),
        (
            {"data_dir": "/srv/b", "credentials.passphrase_file": "/srv/b/passphrase"},
            "credentials.passphrase_file: '/srv/b/passphrase' is inside data_dir /srv/b",
        ),
        ({"credentials.master_key_file": ""}, "credentials.master_key_file: '' is empty"),
        (
            {"credentials.passphrase_file": "/p", "credentials.passphrase_env": "P"},
            "credentials.passphrase_env: 'P' is set with credentials.passphrase_file",
        ),
        ({"credentials.passphrase_env": "ORCHESTRATOR_X"}, "names an ORCHESTRATOR_ variable"),
    ],
)
def test_the_config_keeps_the_master_key_away_from_the_data(flags, problem):
    with pytest.raises(ConfigError, match=re.escape(problem)):
        load_config(None, env={}, flags=flags)
    assert load_config(None, env={}, flags={"data_dir": "/srv/b", "credentials.master_key_file": "/srv/bk"})
