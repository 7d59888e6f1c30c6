"""The agent SDK's settings from the environment (pure)."""

from __future__ import annotations

import pytest

from baaaht.agent import AgentSettings, SettingsError

BUS = "ipc:///run/baaaht/agent/bus.sock"


def test_defaults_need_only_the_bus():
    settings = AgentSettings.from_env({"BAAAHT_BUS": BUS})
    assert settings == AgentSettings(bus=BUS)
    assert settings.bus_loss_limit == 30.0


def test_durations_are_read_as_in_the_hosts_config_and_flags_beat_them():
    environ = {"BAAAHT_BUS": BUS, "BAAAHT_BUS_LOSS_LIMIT": "2s", "BAAAHT_HEARTBEAT_INTERVAL": "250ms"}
    settings = AgentSettings.from_env(environ)
    assert (settings.bus_loss_limit, settings.heartbeat_interval) == (2.0, 0.25)
    assert AgentSettings.from_env(environ, bus_loss_limit=5.0).bus_loss_limit == 5.0


@pytest.mark.parametrize(
    "environ, named",
    [
        ({}, "BAAAHT_BUS is not set"),
        ({"BAAAHT_BUS": "/run/baaaht/agent/bus.sock"}, "BAAAHT_BUS='/run/baaaht/agent/bus.sock'"),
        (
            {"BAAAHT_BUS": BUS, "BAAAHT_BUS_LOSS_LIMIT": "soon"},
            "BAAAHT_BUS_LOSS_LIMIT='soon' is not a duration",
        ),
        (
            {"BAAAHT_BUS": BUS, "BAAAHT_CALL_TIMEOUT": "0s"},
            "BAAAHT_CALL_TIMEOUT=0.0: expected a duration above",
        ),
    ],
)
def test_a_bad_setting_is_refused_naming_it(environ, named):
    with pytest.raises(SettingsError, match=named.replace("(", r"\(")):
        AgentSettings.from_env(environ)
