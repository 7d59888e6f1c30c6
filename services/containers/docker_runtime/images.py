"""Images: whether one is present, and pulling one (a stream of progress)."""

from __future__ import annotations

from typing import Iterator

import docker

from baaaht.schemas.containers import ImageStatus, PullProgress
from baaaht.services.containers.docker_runtime.connection import Connection
from baaaht.services.containers.docker_runtime.streams import EngineStream
from baaaht.services.containers.runtime import EngineFailure, EngineUnavailable, NotFound


class Images:
    engine: Connection

    def image_exists(self, image: str) -> ImageStatus:
        try:
            found = self.engine.call("image inspect", image, lambda api: api.inspect_image(image))
        except NotFound:
            return ImageStatus(exists=False)
        return ImageStatus(exists=True, id=found.get("Id", ""))

    def pull(self, image: str) -> EngineStream[PullProgress]:
        repository, tag = docker.utils.parse_repository_tag(image)

        def parse(api, response) -> Iterator[PullProgress]:
            for raw in api._stream_helper(response, decode=True):
                if raw.get("error"):
                    raise EngineUnavailable(f"pull {image}: {raw['error']}", target=image)
                yield pull_progress(raw)

        params = {"fromImage": repository, "tag": tag or "latest"}
        try:
            return self.engine.open_stream("pull", image, "post", "/images/create", params, parse)
        except EngineFailure as exc:
            # The engine answers 500 for any registry trouble: for the caller the image is unavailable.
            raise EngineUnavailable(exc.message, target=image, details=exc.details) from None


def pull_progress(raw: dict) -> PullProgress:
    detail = raw.get("progressDetail") or {}
    return PullProgress(
        status=raw.get("status", ""),
        layer=raw.get("id", ""),
        current=detail.get("current", 0),
        total=detail.get("total", 0),
    )
