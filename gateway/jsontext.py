"""JSON as RFC 8259 has it, for what operators send: no NaN or Infinity, no key given twice.

Python's json module accepts both by default: NaN and Infinity then reach minted tokens and answers that other
parsers refuse, and of a repeated key the last silently wins (`{"subject": "a", "subject": "root"}`)."""

from __future__ import annotations

import json
import math
from typing import Any


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e400: the words NaN and Infinity are not the only way to it
        raise ValueError(f"{text} is not a finite number")
    return value


def _no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"the key {key!r} appears more than once")
        result[key] = value
    return result


def loads(text: str | bytes) -> Any:
    """Parse `text`; ValueError (UnicodeDecodeError is one) says what is wrong, also for nesting too deep."""
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite, object_pairs_hook=_no_repeats)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
