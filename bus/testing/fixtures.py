"""pytest fixtures of a real host: `pytest_plugins = ["baaaht.bus.testing.fixtures"]` in a
conftest.py makes `host` and `make_host` available."""

from __future__ import annotations

import pytest

from baaaht.bus.testing.host import Host


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
