"""Structured logs: JSON lines or text, level from config, caller's extra fields kept."""

from __future__ import annotations

import io
import logging

import orjson
import pytest

from baaaht.common.logs import setup_logging
from baaaht.schemas.config import LogConfig


@pytest.fixture
def captured():
    """A stream our handler writes to (tests/conftest.py's logging_put_back removes the handler after)."""
    return io.StringIO()


def test_json_lines_carry_the_standard_fields_and_extras(captured):
    setup_logging(LogConfig(level="info", format="json"), "policy", captured)
    logging.getLogger("baaaht.test").info("served %d calls", 3, extra={"service": "policy", "pid": 7})
    record = orjson.loads(captured.getvalue())
    assert record["level"] == "info"
    assert record["process"] == "policy"
    assert record["logger"] == "baaaht.test"
    assert record["message"] == "served 3 calls"
    assert record["time"].endswith("Z")
    assert record["service"] == "policy"
    assert record["extra.pid"] == 7  # a caller's field never replaces one of ours
    assert isinstance(record["pid"], int)


def test_the_level_comes_from_config(captured):
    setup_logging(LogConfig(level="warn", format="json"), "broker", captured)
    log = logging.getLogger("baaaht.test")
    log.info("not shown")
    log.warning("shown")
    lines = [orjson.loads(line) for line in captured.getvalue().splitlines()]
    assert [(line["level"], line["message"]) for line in lines] == [("warn", "shown")]


def test_exceptions_and_unencodable_extras_still_give_one_json_record(captured):
    setup_logging(LogConfig(level="debug", format="json"), "broker", captured)
    try:
        raise ValueError("bad input")
    except ValueError:
        logging.getLogger("baaaht.test").exception("handler failed", extra={"peer": object()})
    [line] = captured.getvalue().splitlines()
    record = orjson.loads(line)
    assert record["level"] == "error"
    assert "ValueError: bad input" in record["exception"]
    assert record["peer"].startswith("<object object")


def test_text_lines_are_readable(captured):
    setup_logging(LogConfig(level="debug", format="text"), "session", captured)
    logging.getLogger("baaaht.test").debug("opened", extra={"session": "s1", "n": 2})
    [line] = captured.getvalue().splitlines()
    assert line.split(" ", 1)[1].startswith("debug ")
    assert line.endswith('baaaht.test: opened session="s1" n=2')
    assert " session[" in line


def test_setting_up_again_replaces_the_handler_instead_of_doubling_lines(captured):
    setup_logging(LogConfig(level="info", format="json"), "broker", captured)
    setup_logging(LogConfig(level="info", format="json"), "broker", captured)
    logging.getLogger("baaaht.test").info("once")
    assert len(captured.getvalue().splitlines()) == 1
