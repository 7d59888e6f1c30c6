"""Commands run inside a running container (docker exec), waited for, their output returned whole."""

from __future__ import annotations

import docker

from baaaht.schemas.containers import ExecResult
from baaaht.services.containers.docker_runtime.connection import Connection

EXEC_OUTPUT_LIMIT = 1024 * 1024  # bytes of each stream an exec result carries


class Execs:
    engine: Connection

    def exec(self, container: str, command: list[str], env: dict[str, str], working_dir: str) -> ExecResult:
        def run(api: docker.APIClient) -> tuple[int, bytes, bytes]:
            created = api.exec_create(
                container, command, environment=env or None, workdir=working_dir or None
            )
            stdout, stderr = api.exec_start(created["Id"], demux=True)
            return api.exec_inspect(created["Id"])["ExitCode"], stdout or b"", stderr or b""

        exit_code, stdout, stderr = self.engine.call("exec", container, run)
        return ExecResult(
            exit_code=exit_code,
            stdout=stdout[:EXEC_OUTPUT_LIMIT].decode(errors="replace"),
            stderr=stderr[:EXEC_OUTPUT_LIMIT].decode(errors="replace"),
            truncated=max(len(stdout), len(stderr)) > EXEC_OUTPUT_LIMIT,
        )
