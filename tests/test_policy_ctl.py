"""`baaaht-ctl policy ...` and `baaaht-ctl audit ...` against a real broker and policy service."""

from __future__ import annotations

import json
import signal

import pytest

from baaaht.bus.testing import wait_for
from baaaht.schemas.containers import ContainerSpec
from baaaht.schemas.policy import PolicyEvaluate, PolicyGet
from baaaht.services.policy import audit
from tests import ctl_runner

ALLOWED = '{"image": "busybox:1.36", "user": "1000:1000", "read_only_rootfs": true}'
DENIED = '{"image": "busybox", "user": "0", "privileged": true}'


@pytest.fixture
def host(make_host):
    made = make_host()
    made.start_service("baaaht.services.policy", "policy", service="policy")
    client = made.client(timeout=1)
    wait_for(lambda: client.call(PolicyGet()), what="the policy service to serve")
    return made


def run(host, *args: str, as_json: bool = False, expect: int = 0, stdin: str | None = None):
    return ctl_runner.invoke(host, *args, *(["--json"] if as_json else []), expect=expect, stdin=stdin)


def test_show(host):
    shown = run(host, "policy", "show").stdout
    assert shown.startswith("# version ") and "from built-in" in shown
    assert "mode: strict" in shown and "allow_bind: false" in shown and "max_memory: 512MB" in shown
    data = json.loads(run(host, "policy", "show", as_json=True).stdout)
    assert data["source"] == "built-in" and data["document"]["security"]["allow_privileged"] is False
    tightened = run(host, "policy", "show", "--override", '{"quotas": {"max_pids": 10, "max_cpus": 64}}')
    assert "max_pids: 10" in tightened.stdout
    assert "# override refused: quotas.max_cpus: would loosen the host policy" in tightened.stdout
    bad = run(host, "policy", "show", "--override", '{"quotas": {"max_pidz": 1}}', expect=1)
    assert "quotas.max_pidz: unknown field" in bad.stderr


def test_explain(host):
    denied = run(host, "policy", "explain", DENIED, expect=1).stdout
    assert denied.splitlines()[0].split() == ["OUTCOME", "RULE", "MESSAGE"]
    assert ["violation", "security.privileged"] in [line.split()[:2] for line in denied.splitlines()]
    assert "denied by image.latest_tag, security.privileged, security.root" in denied
    allowed = run(host, "policy", "explain", "-", stdin=ALLOWED).stdout
    assert ["enforce", "network.disabled"] in [line.split()[:2] for line in allowed.splitlines()]
    assert "allowed: every rule passed" in allowed
    data = json.loads(run(host, "policy", "explain", ALLOWED, as_json=True).stdout)
    assert data["decision"]["enforced"]["network_mode"] == "none"
    assert "invalid container spec: Expected `str`, got `int` - at `$.image`" in (
        run(host, "policy", "explain", '{"image": 5}', expect=1).stderr
    )
    assert audit.read_tail(audit.log_path(host.data_dir), 100)[0][-1].action == "policy.reload"  # not audited


def test_explain_refuses_fields_the_spec_does_not_know(host):
    go_shaped = '{"image": "busybox:1.36", "resources": {"nano_cpus": 500000000, "memory_bytes": 1}}'
    refused = run(host, "policy", "explain", go_shaped, expect=1)
    assert "unknown fields $.resources.nano_cpus, $.resources.memory_bytes" in refused.stderr
    assert refused.stdout == ""
    assert "rule" in run(host, "policy", "explain", go_shaped, "--loose", "--json").stdout


def test_reload(host):
    assert "policy from built-in: unchanged" in run(host, "policy", "reload").stdout


def test_check_needs_no_bus(make_host, tmp_path):
    host = make_host(start=False)  # no broker, no service
    good = tmp_path / "good.yaml"
    good.write_text("mode: permissive\nquotas:\n  max_pids: 64\n")
    assert "good.yaml: valid, mode permissive, version " in run(host, "policy", "check", str(good)).stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("mode: strict\nquotas:\n  max_pids: 0\nsecurity:\n  allow_rot: true\n")
    result = run(host, "policy", "check", str(bad), expect=1)
    assert result.stderr.splitlines() == [
        "quotas.max_pids: Expected int >= 1",
        "security.allow_rot: unknown field",
    ]
    result = run(host, "policy", "check", str(bad), as_json=True, expect=1)
    assert json.loads(result.stdout)["valid"] is False
    missing = run(host, "policy", "check", str(tmp_path / "nope.yaml"), expect=1)
    assert "cannot read" in missing.stderr


def test_audit_tail_and_verify(host):
    client = host.client()
    client.call(PolicyEvaluate(spec=ContainerSpec(image="busybox:1.36", user="1000", read_only_rootfs=True)))
    client.call(PolicyEvaluate(spec=ContainerSpec(image="busybox:1.36", user="0")))
    table = run(host, "audit", "tail").stdout.splitlines()
    assert table[0].split() == [
        "SEQ",
        "TIME",
        "ACTION",
        "DECISION",
        "USER",
        "SESSION",
        "IMAGE",
        "RULES",
        "POLICY",
    ]
    assert [line.split()[0] for line in table[1:]] == ["1", "2", "3"]
    assert "security.root" in table[-1]
    last = run(host, "audit", "tail", "-n", "1", as_json=True).stdout.splitlines()
    assert [json.loads(line)["decision"] for line in last] == ["deny"]
    assert "intact, 3 records" in run(host, "audit", "verify").stdout

    log_path = audit.log_path(host.data_dir)
    head = audit.head_path(log_path)
    kept = head.read_bytes()
    head.unlink()
    unchecked = run(host, "audit", "verify")  # a message, never mixed into the data on stdout
    assert "warning: log: no head file" in unchecked.stderr and unchecked.stdout.startswith(str(log_path))
    head.write_bytes(kept)
    lines = log_path.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b'"deny"', b'"allow"')
    log_path.write_bytes(b"".join(lines))
    result = run(host, "audit", "verify", expect=1)
    assert "line 3: its content does not match its hash" in result.stderr
    assert "TAMPERED OR DAMAGED" in result.stdout
    report = json.loads(run(host, "audit", "verify", as_json=True, expect=1).stdout)
    assert report["ok"] is False and report["problems"][0]["line"] == 3


def test_policy_show_reports_a_refused_reload(make_host, tmp_path):
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text("mode: strict\n")
    made = make_host({"policy": {"path": str(policy_file)}})
    made.start_service("baaaht.services.policy", "policy", service="policy")
    client = made.client(timeout=1)
    wait_for(lambda: client.call(PolicyGet()), what="the policy service to serve")
    assert "# last reload: ok" in run(made, "policy", "show").stdout
    policy_file.write_text("quotas:\n  max_pids: 0\n")
    run(made, "policy", "reload", expect=1)
    shown = run(made, "policy", "show").stdout
    assert "# last reload: FAILED" in shown and "quotas.max_pids" in shown
    last = json.loads(run(made, "policy", "show", as_json=True).stdout)["last_reload"]
    assert last["ok"] is False and last["errors"][0]["path"] == "quotas.max_pids"


def test_audit_commands_read_the_hosts_log_wherever_ctl_thinks_data_lives(host, tmp_path):
    """ctl's own config names another data_dir (its default, say): the host's log is still the one read."""
    ctl_config = tmp_path / "ctl.json"
    ctl_config.write_text(
        json.dumps({"data_dir": str(tmp_path / "not-the-host"), "bus": {"run_dir": host.run_dir}})
    )
    host.client().call(PolicyEvaluate(spec=ContainerSpec(image="busybox:1.36", user="0")))
    host_log = str(audit.log_path(host.data_dir))

    def run_here(*args: str):
        return ctl_runner.invoke_app(["--config", str(ctl_config), *args, "--json"], expect=0)

    report = json.loads(run_here("audit", "verify").stdout)
    assert report["path"] == host_log and report["ok"] is True and report["records"] == 2
    records = run_here("audit", "tail").stdout.splitlines()
    assert [json.loads(line)["action"] for line in records] == ["policy.reload", "container.create"]
    since = run_here("audit", "tail", "--since", "1").stdout.splitlines()
    assert [json.loads(line)["seq"] for line in since] == [2]


def test_a_missing_audit_log_is_an_error_naming_it(host):
    log_path = audit.log_path(host.data_dir)
    # The service records its start-up load once it starts: remove the log after that, not before.
    wait_for(lambda: audit.head_path(log_path).exists(), what="the first audit record")
    log_path.unlink()
    audit.head_path(log_path).unlink()
    verify = run(host, "audit", "verify", expect=1)
    assert f"NOT_FOUND: no audit log at {log_path}" in verify.stderr and "intact" not in verify.stdout
    tail = run(host, "audit", "tail", expect=1)
    assert f"no audit log at {log_path}" in tail.stderr


def test_audit_verify_names_the_first_bad_line(host):
    client = host.client()
    for _ in range(3):
        client.call(PolicyEvaluate(spec=ContainerSpec(image="busybox:1.36", user="0")))
    log_path = audit.log_path(host.data_dir)
    lines = log_path.read_bytes().splitlines(keepends=True)
    del lines[2]
    log_path.write_bytes(b"".join(lines))
    report = json.loads(run(host, "audit", "verify", as_json=True, expect=1).stdout)
    assert report["ok"] is False and report["first_bad_line"] == 3


def test_audit_tail_follow_ends_cleanly_on_ctrl_c(host):
    follower = ctl_runner.popen(host, "audit", "tail", "-f", "-n", "1")
    next_line = ctl_runner.line_reader(follower, "a line from the follower")

    try:
        assert next_line().split()[0] == "SEQ"
        first = next_line().split()
        assert first[0] == "1" and "policy.reload" in first  # the follower is reading now
        host.client().call(PolicyEvaluate(spec=ContainerSpec(image="busybox:1.36", user="0")))
        followed = next_line()
        assert followed.split()[0] == "2" and "security.root" in followed
        follower.send_signal(signal.SIGINT)
        err = ctl_runner.stderr_once_ended(follower)
    finally:
        ctl_runner.reap(follower)
    assert follower.returncode == 0 and "interrupted" in err and "Traceback" not in err
