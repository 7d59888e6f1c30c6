"""The agent image against the real engine: what is inside it, and a cached build that builds nothing."""

from __future__ import annotations

import docker
import pytest

from baaaht.host import agent_images
from tests import container_support

docker_client, test_label = container_support.docker_client, container_support.test_label

pytestmark = pytest.mark.docker

# What an agent never needs: package managers (Debian's and Python's) and setuid or setgid files.
INSPECTION = r"""
id -u; id -g
for tool in apt apt-get apt-cache dpkg dpkg-deb debconf pip pip3 easy_install; do
    command -v "$tool" >/dev/null 2>&1 && echo "tool: $tool"
done
python3 -m pip --version >/dev/null 2>&1 && echo "tool: python -m pip"
python3 -c 'import ensurepip' >/dev/null 2>&1 && echo "tool: ensurepip"
find / -xdev -type f -perm /6000 2>/dev/null | sed 's/^/setuid: /'
python3 -c 'import baaaht.bus.aio, zmq, msgspec; print("imports ok")' 2>/dev/null || echo 'no baaaht'
python3 -c 'import anthropic, openai, httpx; print("llm clients ok")' 2>/dev/null || echo 'no llm clients'
"""


def run_hardened(client: docker.DockerClient, image: str, labels: dict, script: str) -> str:
    output = client.containers.run(
        image,
        ["sh", "-c", script],
        labels=labels,
        remove=True,
        read_only=True,
        network_mode="none",
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        tmpfs={"/tmp": ""},
        init=True,
    )
    return output.decode()


def test_the_agent_image_runs_as_uid_1000_with_no_package_tooling(docker_client, agent_image, test_label):
    lines = run_hardened(docker_client, agent_image, test_label, INSPECTION).splitlines()
    assert lines == ["1000", "1000", "imports ok", "llm clients ok"]


def test_the_inspection_finds_tooling_where_there_is_some(docker_client, agent_image, test_label):
    # The same check on the base, which still has apt and dpkg: it can fail.
    base = agent_images.Recipe.here().base
    lines = run_hardened(docker_client, base, test_label, INSPECTION).splitlines()
    assert lines[:2] == ["0", "0"]
    assert {"tool: apt", "tool: apt-get", "tool: dpkg"} <= set(lines)
    assert any(line.startswith("setuid: ") for line in lines)


class RefusedBuilds:
    """The images API with `build` refused: a cached ensure must not build."""

    def __init__(self, images):
        self.images = images

    def __getattr__(self, name):
        return getattr(self.images, name)

    def build(self, **_kwargs):
        raise AssertionError("a cached image was built again")


class ClientRefusingBuilds:
    def __init__(self, client: docker.DockerClient):
        self.images = RefusedBuilds(client.images)
        self.api = client.api


def test_a_cached_image_is_not_built_again(docker_client, agent_image):
    assert agent_images.ensure_agent_image(ClientRefusingBuilds(docker_client)) == agent_image
