"""Durations and sizes as people write them, and as the config's msgspec hooks read them.

Durations: `30s`, `5m`, `1h`, `250ms`, `1h30m`; a bare number means seconds.
Sizes: `512MB`, `1GB` (powers of 1000), `16MiB`, `1GiB` (powers of 1024), or Docker's short
`512M`, `1G` (powers of 1024, as in `docker run --memory 1g`); a bare number means bytes.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal

from baaaht.schemas.config import Duration, Size

DURATION_EXPECTED = "is not a duration (expected e.g. 30s, 5m, 1h, 250ms)"
SIZE_EXPECTED = "is not a size (expected e.g. 512MB, 16MiB, 1G, or a number of bytes)"

_DURATION_UNITS = {"ms": Decimal("0.001"), "s": Decimal(1), "m": Decimal(60), "h": Decimal(3600)}
_DURATION_TEXT = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|h|m|s))+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_NUMBER_TEXT = re.compile(r"\d+(?:\.\d+)?")

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    **{f"{prefix}b": 1000**power for power, prefix in enumerate("kmgt", start=1)},
    **{f"{prefix}ib": 1024**power for power, prefix in enumerate("kmgt", start=1)},
    **{prefix: 1024**power for power, prefix in enumerate("kmgt", start=1)},
}
_SIZE_TEXT = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]*)", re.IGNORECASE)
# How sizes are written back: whole multiples only, the shortest wins, decimal on a tie.
_SIZE_RENDER_UNITS = (
    ("TB", 1000**4),
    ("GB", 1000**3),
    ("MB", 1000**2),
    ("KB", 1000),
    ("TiB", 1024**4),
    ("GiB", 1024**3),
    ("MiB", 1024**2),
    ("KiB", 1024),
)


def is_number(value: object) -> bool:
    """A real number, not a bool (which Python counts as an int)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_duration(value: object) -> Duration:
    if isinstance(value, Duration):
        return value
    if is_number(value) and math.isfinite(value) and value >= 0:
        return Duration(value)
    if isinstance(value, str):
        text = value.strip()
        if _NUMBER_TEXT.fullmatch(text):
            return Duration(float(text))
        if _DURATION_TEXT.fullmatch(text):
            seconds = sum(Decimal(n) * _DURATION_UNITS[unit] for n, unit in _DURATION_PART.findall(text))
            return Duration(float(seconds))
    raise ValueError(DURATION_EXPECTED)


def parse_size(value: object) -> Size:
    if isinstance(value, Size):
        return value
    amount: Decimal | None = None
    if is_number(value) and math.isfinite(value) and value >= 0:
        amount = Decimal(value)
    elif isinstance(value, str) and (match := _SIZE_TEXT.fullmatch(value.strip())):
        number, unit = match.groups()
        if unit.lower() in _SIZE_UNITS:
            amount = Decimal(number) * _SIZE_UNITS[unit.lower()]
    if amount is None:
        raise ValueError(SIZE_EXPECTED)
    if amount != amount.to_integral_value():
        raise ValueError("is not a whole number of bytes")
    return Size(int(amount))


def render_duration(seconds: float) -> str:
    milliseconds = seconds * 1000
    if milliseconds == 0:
        return "0s"
    if not math.isclose(milliseconds, round(milliseconds), rel_tol=0, abs_tol=1e-6):
        return f"{seconds:.9f}".rstrip("0") + "s"
    whole = round(milliseconds)
    for unit, factor in (("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if whole % factor == 0:
            return f"{whole // factor}{unit}"
    return f"{whole}ms"


def render_size(size: int) -> str:
    candidates = [
        f"{size // factor}{unit}" for unit, factor in _SIZE_RENDER_UNITS if size and size % factor == 0
    ]
    return min(candidates, key=len) if candidates else f"{size}B"


def dec_hook(type_: type, value: object) -> object:
    """msgspec decode hook for the config's own scalar types."""
    if type_ is Duration:
        return parse_duration(value)
    if type_ is Size:
        return parse_size(value)
    raise NotImplementedError(f"no decoder for {type_!r}")


def enc_hook(value: object) -> object:
    """msgspec encode hook: durations and sizes are written the way people write them."""
    if isinstance(value, Duration):
        return render_duration(value)
    if isinstance(value, Size):
        return render_size(value)
    raise NotImplementedError(f"cannot encode {type(value).__name__}")
