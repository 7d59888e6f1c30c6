"""Apple Containers: refused clearly rather than stubbed.

Apple's `container` CLI only exists on macOS, and baaaht does not drive it yet. Choosing this runtime
fails at start-up with the reason, so no operation ever pretends to work; `runtime.type=auto` on macOS
falls back to Docker.
"""

from __future__ import annotations

import shutil
import sys

from baaaht.schemas.config import Config
from baaaht.services.containers.runtime import RuntimeUnavailable


class AppleRuntime:
    name = "apple"

    def __init__(self, config: Config, *, platform: str = sys.platform):
        if platform != "darwin":
            raise RuntimeUnavailable(
                "apple runtime is not supported on this host: "
                f"Apple Containers need macOS, this is {platform}"
            )
        if shutil.which("container") is None:
            raise RuntimeUnavailable(
                "apple runtime is not supported on this host: the `container` CLI is missing"
            )
        raise RuntimeUnavailable(
            "apple runtime is not supported by this version of baaaht; set runtime.type to docker"
        )
