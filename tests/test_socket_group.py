"""The broker's sockets belong to a dedicated, unprivileged group, which agent containers join (8.11)."""

from __future__ import annotations

import grp
import os
import subprocess
import uuid

import pytest

from baaaht.common import socket_group
from baaaht.common.endpoints import Endpoints, ipc_path
from baaaht.common.socket_group import GroupError


@pytest.fixture
def new_group_name():
    """A group name nobody has; the group is deleted again if a test made it."""
    name = f"bt-{uuid.uuid4().hex[:12]}"
    yield name
    if any(group.gr_name == name for group in grp.getgrall()):
        subprocess.run(["groupdel", name], check=True, capture_output=True, timeout=30)


@pytest.mark.parametrize(
    "group, problem",
    [
        ("0", "is gid 0"),
        ("root", "root's"),
        ("", "is not a group name"),
        ("Agents!", "is not a group name"),
        ("4242", ""),
        ("baaaht-agent", ""),
        ("no-such-group-yet", ""),  # created by the broker
    ],
)
def test_what_may_be_the_socket_group(group, problem):
    found = socket_group.problem_with(group)
    assert (problem in found) if problem else found == ""


def test_a_missing_group_is_created_and_a_numeric_gid_is_used_as_given(new_group_name):
    gid = socket_group.ensure_gid(new_group_name)
    assert gid > 0 and grp.getgrnam(new_group_name).gr_gid == gid
    assert socket_group.ensure_gid(new_group_name) == gid  # exists now: found, not created again
    assert socket_group.ensure_gid("4242") == 4242
    with pytest.raises(GroupError, match="gid 0"):
        socket_group.ensure_gid("0")


def test_the_broker_gives_its_sockets_the_configured_group_never_root(make_host, new_group_name):
    host = make_host({"bus": {"socket_group": new_group_name}})
    gid = grp.getgrnam(new_group_name).gr_gid
    endpoints = Endpoints.for_config(host.config.bus)
    for path in (endpoints.agent_dir, ipc_path(endpoints.agents), ipc_path(endpoints.services)):
        assert os.stat(path).st_gid == gid != 0


def test_by_default_the_sockets_group_is_the_dedicated_one(make_host):
    host = make_host()
    agent_dir = Endpoints.for_config(host.config.bus).agent_dir
    assert os.stat(agent_dir).st_gid == grp.getgrnam(socket_group.DEFAULT_SOCKET_GROUP).gr_gid != 0
