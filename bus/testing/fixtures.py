"""pytest fixtures of a real host: `pytest_plugins = ["baaaht.bus.testing.fixtures"]` in a
conftest.py makes `host`, `make_host` and `agent_image` available."""

from __future__ import annotations

import subprocess
import sys

import pytest

from baaaht.bus.testing.host import Host

IMAGE_BUILD_TIMEOUT = 900.0  # seconds: a first build debootstraps the base


@pytest.fixture
def host(tmp_path):
    """A running broker on a private run directory; start services with host.start_service(...)."""
    running = Host(tmp_path)
    running.start_broker()
    yield running
    running.stop()


@pytest.fixture
def make_host(tmp_path):
    """Hosts with config overrides: make_host({"bus": {...}}); the broker is started unless
    start=False. Every host made is stopped after the test."""
    made: list[Host] = []

    def make(overrides: dict | None = None, start: bool = True) -> Host:
        made_host = Host(tmp_path / f"host{len(made)}", overrides)
        made.append(made_host)
        if start:
            made_host.start_broker()
        return made_host

    yield make
    for made_host in made:
        made_host.stop()


@pytest.fixture(scope="session")
def agent_image() -> str:
    """The agent image's reference (`baaaht/agent:<hash>`), built once when missing or stale, by the
    same command as `make images` (the builder is the host's: the test kit does not import it). The first
    build debootstraps the base (about a minute); later sessions reuse the image while its inputs stay."""
    built = subprocess.run(
        [sys.executable, "-m", "baaaht.host.images", "agent"],
        capture_output=True,
        text=True,
        timeout=IMAGE_BUILD_TIMEOUT,
    )
    if built.returncode != 0:
        pytest.fail(f"cannot build the agent image: {built.stderr.strip()}", pytrace=False)
    return built.stdout.strip()
