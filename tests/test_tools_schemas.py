"""The tools' schemas: one decoder for every call, constraints refused at decode, JSON Schemas for LLMs."""

from __future__ import annotations

import re

import msgspec
import pytest

from baaaht.schemas.tools import CALL_DECODER, TOOLS, ToolExec, ToolReadFile, tool_schemas


def test_every_call_round_trips_through_the_one_decoder():
    for call in (ToolReadFile(path="a", start_line=2), ToolExec(argv=["true"], env={"A": "1"})):
        assert CALL_DECODER.decode(msgspec.msgpack.encode(call)) == call


@pytest.mark.parametrize(
    "raw,field",
    [
        ({"tool": "read_file", "path": ""}, "$.path"),
        ({"tool": "read_file", "path": "a", "max_bytes": 0}, "$.max_bytes"),
        ({"tool": "exec", "argv": []}, "$.argv"),
        ({"tool": "exec", "argv": ["x"], "env": {"A=B": "1"}}, "$.env"),
        ({"tool": "exec", "argv": ["x"], "timeout": 0}, "$.timeout"),
        ({"tool": "fetch", "url": "http://egress/x", "method": "TRACE"}, "$.method"),
    ],
)
def test_bad_calls_are_refused_at_decode_naming_the_field(raw, field):
    with pytest.raises(msgspec.ValidationError, match=re.escape(f"`{field}`")):
        CALL_DECODER.decode(msgspec.msgpack.encode(raw))


def test_each_tool_has_an_llm_definition_from_its_type():
    definitions = {tool["name"]: tool for tool in tool_schemas()}
    assert list(definitions) == [call.__struct_config__.tag for call in TOOLS]
    read = definitions["read_file"]
    assert read["description"].startswith("Read a text file")
    assert read["input_schema"]["required"] == ["path"] and "tool" not in read["input_schema"]["properties"]
    assert read["input_schema"]["properties"]["max_bytes"]["maximum"] == 4 * 1024 * 1024
    assert definitions["exec"]["input_schema"]["properties"]["argv"]["minItems"] == 1
    for tool in definitions.values():
        assert tool["description"] and tool["input_schema"]["type"] == "object"
