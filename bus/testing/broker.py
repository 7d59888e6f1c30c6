"""The broker as tests run it: the real one, with an identity adapter that also reads a fake /proc.

    python -m baaaht.bus.testing.broker --config CONFIG --proc DIR

`DIR/<pid>/cgroup` makes a host process (a test, a helper it spawned) look like a process of the
container that file names, so tests can play agents of any session and role without a container;
pids without such a file are looked up in the real /proc (real agent containers). Identities come
from the run directory as in production (`Host.identify` writes both). Never used outside tests.
"""

from __future__ import annotations

from baaaht.bus.broker import arguments, serve
from baaaht.bus.identities import ContainerIdentities
from baaaht.common.identity import container_of_pid


class TestIdentities(ContainerIdentities):
    """The real adapter, with the fake /proc `fake_proc` read first."""

    def __init__(self, run_dir: str, fake_proc: str) -> None:
        super().__init__(run_dir)
        self.fake_proc = fake_proc

    def container_of(self, pid: int) -> str | None:
        return container_of_pid(pid, self.fake_proc) or super().container_of(pid)


def main(argv: list[str] | None = None) -> None:
    parser = arguments("baaaht-test-broker")
    parser.add_argument("--proc", required=True, help="the fake /proc: DIR/<pid>/cgroup")
    args = parser.parse_args(argv)
    serve(args.config, lambda run_dir: TestIdentities(run_dir, args.proc))


if __name__ == "__main__":
    main()
