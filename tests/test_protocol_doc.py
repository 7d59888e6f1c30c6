"""docs/PROTOCOL.md states facts the code can change under it: the streaming methods, the error
codes, the authorization table and the limits. Each test fails when the doc goes stale."""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import re
from pathlib import Path

import baaaht.services
from baaaht.bus import broker, registry, wire
from baaaht.bus.authorize import ACTIONS, DOMAINS, RULES
from baaaht.bus.service import Service
from baaaht.schemas.bus import BusEventsReplay
from baaaht.schemas.config import BusConfig, LimitsConfig
from baaaht.schemas.errors import ErrorCode

DOC = Path(__file__).resolve().parents[1] / "docs" / "PROTOCOL.md"
MiB = 1024 * 1024


def section(name: str) -> list[list[str]]:
    """The rows (cells stripped) of the table between <!-- name --> and <!-- /name -->."""
    text = DOC.read_text()
    found = re.search(rf"<!-- {name} -->\n(.*?)<!-- /{name} -->", text, re.S)
    assert found, f"docs/PROTOCOL.md has no <!-- {name} --> table"
    lines = [line for line in found.group(1).splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def every_service() -> list[type[Service]]:
    services = []
    for package in pkgutil.iter_modules(baaaht.services.__path__):
        if importlib.util.find_spec(f"baaaht.services.{package.name}.service") is None:
            continue  # a package of parts a service runs (services/credentials/egress before its service)
        module = importlib.import_module(f"baaaht.services.{package.name}.service")
        services += [
            value
            for value in vars(module).values()
            if isinstance(value, type) and issubclass(value, Service) and value.__module__ == module.__name__
        ]
    return services


def test_the_streaming_methods_listed_are_the_services_stream_rpcs():
    services = every_service()
    assert {s.name for s in services} >= {"container", "policy", "session"}
    in_code = {s.name: sorted(target for target, spec in s.rpcs().items() if spec.stream) for s in services}
    in_doc = {
        row[0].strip("`"): [] if row[1] == "none" else sorted(m.strip(" `") for m in row[1].split(","))
        for row in section("streaming-methods")
    }
    assert in_doc == in_code


def test_every_error_code_is_explained():
    assert [row[0].strip("`") for row in section("error-codes")] == [code.value for code in ErrorCode]


def rules_cell(rules) -> str:
    if not rules:
        return "nothing"
    return "; ".join(f"`{pattern}`" if allowed else f"not `{pattern}`" for pattern, allowed in rules)


def test_the_authorization_table_is_the_one_authorize_uses():
    in_code = [[f"`{role}`", *(rules_cell(RULES[role].get(a, ())) for a in ACTIONS)] for role in RULES]
    assert section("authorization") == in_code


def test_the_service_domains_are_the_ones_authorize_uses():
    in_code = [[f"`{service}`", ", ".join(f"`{t}`" for t in topics)] for service, topics in DOMAINS.items()]
    assert section("domains") == in_code


def size(n: int) -> str:
    return f"{n // MiB} MiB" if n % MiB == 0 else f"{n:,} bytes"


def test_the_limits_are_the_config_defaults_and_the_codes_constants():
    bus = BusConfig()
    expected = {
        "`bus.max_message_size`": size(int(bus.max_message_size)),
        "`bus.max_event_size`": size(int(bus.max_event_size)),
        "`bus.event_history`": f"{bus.event_history:,}",
        "`bus.event_history_bytes`": size(int(bus.event_history_bytes)),
        "`bus.heartbeat_interval`": f"{float(bus.heartbeat_interval):g} s",
        "`bus.heartbeat_liveness`": str(bus.heartbeat_liveness),
        "`bus.call_timeout`": f"{float(bus.call_timeout):g} s",
    }
    rows = {row[0]: row for row in section("limits")}
    assert {row[1]: row[2] for row in rows.values() if row[1] in expected} == expected
    assert rows["replay `limit`"][2] == f"{broker.REPLAY_LIMIT_MAX:,}"
    assert f"default is {BusEventsReplay().limit}" in rows["replay `limit`"][3]
    assert rows["header"][2] == f"{wire.MAX_HEADER:,} bytes"
    assert rows["event nesting"][2] == f"{registry.MAX_NESTING} levels"
    assert f"plus {broker.HEADER_SLACK // 1024} KiB" in rows["request body"][3]


def test_the_fairness_limits_are_the_config_defaults():
    limits = LimitsConfig()
    expected = {
        "`limits.agent_in_flight`": f"{limits.agent_in_flight:,}",
        "`limits.host_in_flight`": f"{limits.host_in_flight:,}",
        "`limits.agent_bytes_in_flight`": size(int(limits.agent_bytes_in_flight)),
        "`limits.queued_per_caller`": f"{limits.queued_per_caller:,}",
        "`limits.agent_running_per_caller`": f"{limits.agent_running_per_caller:,}",
        "`limits.agent_events_per_second`, `limits.agent_event_burst`": (
            f"{limits.agent_events_per_second:g}/s, bursts of {limits.agent_event_burst:,}"
        ),
        "`limits.agent_event_bytes_per_second`, `limits.agent_event_burst_bytes`": (
            f"{size(int(limits.agent_event_bytes_per_second))}/s,"
            f" bursts of {size(int(limits.agent_event_burst_bytes))}"
        ),
        "`limits.agent_event_history`, `limits.agent_event_history_bytes`": (
            f"{limits.agent_event_history:,}, {size(int(limits.agent_event_history_bytes))}"
        ),
        "`limits.agent_replay_bytes_per_second`": f"{size(int(limits.agent_replay_bytes_per_second))}/s",
        "`limits.session_messages_per_minute`": f"{limits.session_messages_per_minute:,}",
        "`limits.session_message_bytes_per_minute`": size(int(limits.session_message_bytes_per_minute)),
        "`limits.session_cancels_per_minute`": f"{limits.session_cancels_per_minute:,}",
        "`limits.session_tasks_per_minute`": f"{limits.session_tasks_per_minute:,}",
    }
    rows = {row[1]: row[2] for row in section("limits") if row[1].startswith("`limits.")}
    assert rows == expected
    [replayed] = [row[3] for row in section("limits") if row[1] == "`limits.agent_replay_bytes_per_second`"]
    assert f"or {registry.REPLAY_SCAN_BYTES} bytes for each kept event it looks at" in replayed
    threads = " ".join(DOC.read_text().split("## Threads", 1)[1].split())
    assert f"up to {broker.BATCH} messages from the services' socket, {broker.AGENT_BATCH}" in threads
    assert f"(or {broker.BATCH_BYTES // MiB} MiB from either)" in threads
