"""docs/WIRE-TYPES.md is generated from the schemas (baaaht.bus.reference) and must stay current."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from baaaht.bus import reference

REPO = Path(__file__).resolve().parent.parent


def test_committed_reference_is_current():
    committed = (REPO / reference.OUTPUT).read_text(encoding="utf-8")
    assert committed == reference.render(), (
        f"{reference.OUTPUT} is stale: the wire types changed. Run `make docs` and commit the result."
    )


def test_every_named_wire_type_is_documented_and_bases_are_not():
    text = reference.render()
    for heading in (
        "Register",
        "Caller",
        "ErrorBody",
        "EventStamp",
        "ServiceHealth",
        "RequestHeader",
        "ReplyHeader",
        "ContainerGet",
    ):
        assert f"\n### {heading}\n" in text
    for base in ("Request", "Response", "Event", "ContainerRef", "ContainerEvent", "Section"):
        assert f"\n### {base}\n" not in text


def test_a_new_schema_module_is_picked_up_with_its_tags_defaults_and_constraints(tmp_path):
    # A package of its own, rendered in a separate interpreter: its Request subclass must not
    # join the real schemas' subclass lists in this process.
    package = tmp_path / "probe_schemas"
    package.mkdir()
    (package / "__init__.py").write_text('"""Probe types."""\n')
    (package / "things.py").write_text(
        textwrap.dedent(
            '''
            """Things for the probe."""
            import enum
            from typing import Annotated, ClassVar, Literal
            import msgspec
            from baaaht.schemas.base import Request, Response

            class Colour(str, enum.Enum):
                RED = "red"
                BLUE = "blue"

            class Point(msgspec.Struct, array_like=True):
                x: int
                y: int = 0

            class Drawn(Response, kw_only=True):
                """What was drawn."""
                points: list[Point] = []

            class Draw(Request, tag="probe.draw", kw_only=True):
                response: ClassVar[type] = Drawn
                count: Annotated[int, msgspec.Meta(ge=1, le=9, description="how many")] = 1
                names: list[Annotated[str, msgspec.Meta(max_length=4)]] = []
                colour: Colour = Colour.RED
                shape: Literal["dot", "ring"] = "dot"
            '''
        )
    )
    result = subprocess.run(
        [sys.executable, "-c", "from baaaht.bus.reference import render; print(render(['probe_schemas']))"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "## `probe_schemas.things`\n\nThings for the probe." in text
    assert (
        "Request to `probe.draw` (in field `type`), answered with [Drawn](#probe_schemas-things-drawn)"
        in text
    )
    assert "Response to [`probe.draw`](#probe_schemas-things-draw), map, omits defaults." in text
    assert "| `count` | int | `1` | ≥ 1; ≤ 9 | how many |" in text
    assert "| `names` | list[str] | `[]` | item max length 4 |  |" in text
    assert '| `colour` | [Colour](#probe_schemas-things-colour) | `"red"` |' in text
    assert '| `shape` | "dot" \\| "ring" | `"dot"` |' in text
    assert "| 0 | `x` | int | required |" in text
    assert "Encoded as its value: `red`, `blue`." in text
