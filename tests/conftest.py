import logging
import os
import subprocess
from pathlib import Path

import docker.api.client
import pytest
import zmq

from baaaht.bus.testing import short_run_dir
from baaaht.common.logs import HANDLER_NAME

# host, make_host from the test kit; pytester: tests/test_dev_targets.py and tests/test_leftover_mounts.py
# run pytest on made-up test files; tests.leftover_mounts fails a module that leaves a mount or a loop
# device in its own directories.
pytest_plugins = ["baaaht.bus.testing.fixtures", "pytester", "tests.leftover_mounts"]

ECHO_SERVICE = str(Path(__file__).parent / "services" / "echo.py")

# Test files of pure logic: no process, no engine; `make test-unit` runs only these (marker `unit`), and
# every test in them runs behind the unit boundary below, in every run, so a file listed here that starts
# a process or talks to the engine fails instead of slowing the unit run down unnoticed. A file not listed
# is an integration test (marker `integration`): a new file is at worst run with the slow ones.
UNIT_TEST_FILES = frozenset(
    {
        "test_agent_sdk_echo.py",
        "test_agent_worker.py",
        "test_agent_sdk_settings.py",
        "test_assistant_autostart.py",
        "test_assistant_config.py",
        "test_assistant_spec.py",
        "test_assistant_context.py",
        "test_assistant_settings.py",
        "test_assistant_streams.py",
        "test_scheduler_streams.py",
        "test_assistant_tools.py",
        "test_assistant_turns.py",
        "test_ctl_conversation.py",
        "test_authorize.py",
        "test_config.py",
        "test_containers_identities.py",
        "test_containers_logic.py",
        "test_curve_logic.py",
        "test_containers_ownership.py",
        "test_containers_pool.py",
        "test_containers_service.py",
        "test_credentials_service.py",
        "test_credentials_store.py",
        "test_egress_logic.py",
        "test_egress_refusal_limit.py",
        "test_event_order.py",
        "test_fairness.py",
        "test_identity.py",
        "test_images_logic.py",
        "test_layers.py",
        "test_logs.py",
        "test_policy_audit.py",
        "test_policy_document.py",
        "test_policy_engine.py",
        "test_policy_images.py",
        "test_policy_mounts.py",
        "test_policy_overrides.py",
        "test_policy_properties.py",
        "test_policy_service.py",
        "test_registry.py",
        "test_schema_constraints.py",
        "test_session_agents.py",
        "test_session_agents_ended.py",
        "test_sessions_service.py",
        "test_sessions_states.py",
        "test_sessions_store.py",
        "test_scheduler_engine.py",
        "test_scheduler_logic.py",
        "test_scheduler_store.py",
        "test_testing.py",
        "test_tools_fetch.py",
        "test_tools_files.py",
        "test_tools_schemas.py",
        "test_workspace_files.py",
        "test_workspaces_logic.py",
    }
)


def pytest_collection_modifyitems(items):
    for item in items:
        marker = "unit" if item.path.name in UNIT_TEST_FILES else "integration"
        item.add_marker(marker)


@pytest.fixture(autouse=True)
def logging_put_back():
    """Handlers a test added to the root logger go with it (an entry point's `main` run in process sets
    up logging on the test's captured stderr, closed after the test: a later test's thread logging into
    it printed '--- Logging error ---'), and the root's level is put back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers[:]:
        if handler.get_name() == HANDLER_NAME and handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture
def silent_broker():
    """A ROUTER on a run directory's services socket that answers nothing (unless the test does):
    the run dir, its endpoint and the ROUTER."""
    run_dir = short_run_dir()
    endpoint = f"ipc://{run_dir}/bus.sock"
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(endpoint)
    yield run_dir, endpoint, router
    router.close(linger=0)
    os.unlink(f"{run_dir}/bus.sock")
    os.rmdir(run_dir)


class UnitBoundaryCrossed(Exception):
    pass


@pytest.fixture(autouse=True)
def unit_boundary(request, monkeypatch):
    """In a unit test, starting a process or creating a Docker client fails the test (even if the code
    under test catches the exception)."""
    if request.node.get_closest_marker("unit") is None:
        yield
        return
    crossings: list[str] = []

    def refuse(what: str):
        def refused(*args, **kwargs):
            crossings.append(what)
            raise UnitBoundaryCrossed(
                f"a unit test tried to {what}: move its file out of UNIT_TEST_FILES in tests/conftest.py"
            )

        return refused

    monkeypatch.setattr(subprocess.Popen, "_execute_child", refuse("start a process"))
    for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system", "execv", "execve"):
        monkeypatch.setattr(os, name, refuse(f"start a process (os.{name})"))
    monkeypatch.setattr(docker.api.client.APIClient, "__init__", refuse("talk to the Docker engine"))
    yield
    if crossings:
        pytest.fail(f"a unit test crossed the unit boundary: {', '.join(crossings)}")


@pytest.fixture
def echo(host):
    """A host with the test echo service (tests/services/echo.py) registered."""
    host.start_service(ECHO_SERVICE, "echo")
    return host
