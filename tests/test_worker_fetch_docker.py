"""fetch through the whole path: the session's worker (a real agent container) calls the egress proxy the
credential service runs on the agents' socket; the proxy knows the worker by its container's identity and
answers by its routes (nothing leaves unless a route allows the worker's role)."""

from __future__ import annotations

import json

import pytest

from baaaht.schemas.tools import ToolFetch
from tests import container_support
from tests.worker_support import WorkerHost, settings

docker_client = container_support.docker_client

pytestmark = pytest.mark.docker

ROUTES = [
    # An assistant's route only: a worker is refused it.
    {
        "name": "model",
        "upstream": "https://127.0.0.1:9",
        "credential": "k",
        "paths": ["/v1/x"],
        "roles": ["assistant"],
    },
]


@pytest.fixture
def world(make_host, docker_client, agent_image):
    host = make_host(settings(agent_image, egress={"routes": ROUTES}))
    host.start_service("baaaht.services.credentials", "credential")
    made = WorkerHost(host, docker_client)
    yield made
    made.cleanup()


def test_fetch_goes_through_the_egress_proxy_and_is_refused_what_no_route_allows_the_worker(world):
    session = world.session()
    for url, refused in [("http://egress/model/v1/x", "role"), ("http://egress/unknown/v1/x", "route")]:
        result = world.output(session, ToolFetch(url=url, method="POST", body="{}"))
        assert result.status in (403, 404), (url, result)
        assert json.loads(result.body)["error"]["refused"] == refused, (url, result.body)
