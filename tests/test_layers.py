"""Layers point one way: schemas and common at the bottom, bus above, services above the bus, host and
ctl on top. Every import is read from the source (lazy ones inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# layer -> the layers it may import (itself included)
ALLOWED = {
    "schemas": {"schemas"},
    "common": {"schemas", "common"},
    "bus": {"schemas", "common", "bus"},
    "services": {"schemas", "common", "bus", "services"},
    "host": {"schemas", "common", "bus", "services", "host"},
    "ctl": {"schemas", "common", "bus", "ctl"},
    "agent": {"schemas", "common", "bus", "agent"},  # the SDK runs inside containers: the bus and below
}
# Packages of another layer a layer may import too: the tools' pure file code (paths beneath a workspace
# root) serves the container manager's workspace calls, so both resolve paths the same way.
SHARED = {"services": ("baaaht.agent.tools.",)}


def imported_modules(source: str) -> list[tuple[int, str]]:
    """(line, dotted module) for every baaaht module the source imports."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "baaaht":  # `from baaaht import schemas`
                found += [(node.lineno, f"baaaht.{alias.name}") for alias in node.names]
            else:
                found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return [(line, name) for line, name in found if name.startswith("baaaht.")]


def wrong_way_imports(layer: str, path: str, source: str) -> list[str]:
    """What one file of `layer` imports against the rule; services also never import each other."""
    problems = []
    own_service = path.split("/")[1] if layer == "services" else ""
    for line, name in imported_modules(source):
        parts = name.split(".")
        target = parts[1]
        if name.startswith(SHARED.get(layer, ())):
            continue
        if target not in ALLOWED[layer]:
            problems.append(f"{path}:{line} imports {name} ({layer} may import {sorted(ALLOWED[layer])})")
        elif layer == "services" and target == "services" and len(parts) > 2 and parts[2] != own_service:
            problems.append(f"{path}:{line} imports {name} (services talk to each other over the bus)")
    return problems


def test_no_import_points_the_wrong_way():
    problems = []
    for layer in ALLOWED:
        for file in sorted((ROOT / layer).rglob("*.py")):
            relative = file.relative_to(ROOT).as_posix()
            problems += wrong_way_imports(layer, relative, file.read_text(encoding="utf-8"))
    assert problems == []


@pytest.mark.parametrize(
    "layer, path, source",
    [
        ("ctl", "ctl/x.py", "from baaaht.services.policy import audit\n"),
        ("bus", "bus/x.py", "def main():\n    from baaaht.host.config import load_config\n"),
        ("common", "common/x.py", "import baaaht.bus.wire\n"),
        ("schemas", "schemas/x.py", "from baaaht import common\n"),
        ("services", "services/containers/x.py", "from baaaht.services.policy.engine import evaluate\n"),
    ],
)
def test_a_wrong_way_import_is_found(layer, path, source):
    assert wrong_way_imports(layer, path, source)


def test_imports_that_follow_the_rule_pass():
    source = (
        "from baaaht.schemas.config import Config\nfrom baaaht.common import units\nimport baaaht.bus.wire\n"
    )
    assert wrong_way_imports("ctl", "ctl/x.py", source) == []
    assert (
        wrong_way_imports("services", "services/policy/x.py", "from baaaht.services.policy import audit\n")
        == []
    )
