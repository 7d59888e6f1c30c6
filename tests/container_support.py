"""Fixtures for tests that need the real Docker engine (scripts/ensure-docker.sh starts it).

Import the fixtures you use into the test module. Every container a test makes carries the label
`baaaht.test=<unique id>` (or belongs to the test's own installation id) and is removed by label afterwards.
"""

from __future__ import annotations

import uuid

import docker
import pytest

from baaaht.host.images import ensure_busybox_image

TEST_LABEL = "baaaht.test"


@pytest.fixture(scope="session")
def docker_client():
    try:
        client = docker.from_env(timeout=60)
        client.ping()
    except docker.errors.DockerException as exc:
        pytest.fail(f"no Docker engine answers ({exc}); run scripts/ensure-docker.sh first")
    yield client
    client.close()


@pytest.fixture(scope="session")
def busybox(docker_client) -> str:
    """The tag of the locally built busybox image (built once per run)."""
    return ensure_busybox_image(docker_client)


def remove_labelled(client: docker.DockerClient, label: str) -> None:
    for container in client.containers.list(all=True, sparse=True, filters={"label": label}):
        try:
            container.remove(force=True, v=True)
        except docker.errors.NotFound:
            pass  # removed meanwhile (auto-remove)


def remove_volume(client: docker.DockerClient, name: str) -> None:
    try:
        client.api.remove_volume(name, force=True)
    except docker.errors.NotFound:
        pass  # never made, or removed by the test


def remove_labelled_volumes(client: docker.DockerClient, label: str) -> None:
    for volume in client.api.volumes(filters={"label": label}).get("Volumes") or []:
        remove_volume(client, volume["Name"])


@pytest.fixture
def test_label(docker_client):
    """A label unique to this test; its containers are removed afterwards."""
    value = uuid.uuid4().hex
    yield {TEST_LABEL: value}
    remove_labelled(docker_client, f"{TEST_LABEL}={value}")
