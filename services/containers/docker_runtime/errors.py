"""docker SDK and transport exceptions -> the runtime's own error kinds (services/containers/runtime.py)."""

from __future__ import annotations

import contextlib
from typing import Iterator

import docker
import requests
import urllib3

from baaaht.services.containers.runtime import (
    Conflict,
    EngineError,
    EngineFailure,
    EngineTimeout,
    EngineUnavailable,
    Invalid,
    NotFound,
    WrongState,
)

# Engine messages that mean "not in the state this operation needs", which Docker sends as 500 or 409.
STATE_CONFLICTS = ("is not running", "is not paused", "is already paused", "is paused", "is restarting")
# Operations whose 409 means "the name is taken" rather than "in the wrong state".
NAMING = ("create", "volume create")


class EngineErrors:
    def __init__(self, host: str, timeout: float):
        self.host = host
        self.timeout = timeout

    @contextlib.contextmanager
    def translate(self, operation: str, target: str = "") -> Iterator[None]:
        subject = f"{operation} {target}".strip()
        try:
            yield
        except EngineError:
            raise
        except docker.errors.NotFound as exc:
            raise NotFound(f"{subject}: {exc.explanation}", target=target) from None
        except docker.errors.APIError as exc:
            raise api_error(operation, subject, target, exc) from None
        except requests.exceptions.ConnectTimeout as exc:
            raise self.unreachable(exc) from None
        except requests.exceptions.ReadTimeout:
            raise EngineTimeout(
                f"{subject}: the docker engine at {self.host} did not answer within {self.timeout:g}s",
                target=target,
            ) from None
        except (requests.exceptions.ConnectionError, urllib3.exceptions.HTTPError, OSError) as exc:
            raise self.unreachable(exc) from None
        except docker.errors.DockerException as exc:
            raise self.unreachable(exc) from None

    def unreachable(self, exc: BaseException) -> EngineUnavailable:
        return EngineUnavailable(
            f"the docker engine at {self.host} is unreachable: {exc}", details={"host": self.host}
        )


def api_error(operation: str, subject: str, target: str, exc: docker.errors.APIError) -> EngineError:
    explanation = str(exc.explanation or exc)
    status = exc.status_code or 500
    details = {"engine_status": status}
    if status == 409 and operation in NAMING:
        return Conflict(f"{subject}: {explanation}", target=target, details=details)
    if status == 409 or any(marker in explanation for marker in STATE_CONFLICTS):
        return WrongState(f"{subject}: {explanation}", target=target, details=details)
    if status == 400:
        return Invalid(f"{subject}: {explanation}", target=target, details=details)
    return EngineFailure(
        f"{subject}: docker engine error {status}: {explanation}", target=target, details=details
    )
