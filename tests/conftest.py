from pathlib import Path

import pytest

from tests.harness import Host

ECHO_SERVICE = str(Path(__file__).parent / "services" / "echo.py")


@pytest.fixture
def host(tmp_path):
    """A running broker on a private run directory; start services with host.start_service(...)."""
    running = Host(tmp_path)
    running.start_broker()
    yield running
    running.stop()


@pytest.fixture
def echo(host):
    """A host with the test echo service (tests/services/echo.py) registered."""
    host.start_service(ECHO_SERVICE, "echo")
    return host


@pytest.fixture
def make_host(tmp_path):
    """A host with config overrides: make_host({"bus": {...}}); the broker is started."""
    made = []

    def make(overrides: dict | None = None, start: bool = True) -> Host:
        made_host = Host(tmp_path / f"host{len(made)}", overrides)
        made.append(made_host)
        if start:
            made_host.start_broker()
        return made_host

    yield make
    for made_host in made:
        made_host.stop()
