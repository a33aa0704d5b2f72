"""JSON from outside the node, strictly: operator commands, ETSI 014 requests.

``json.loads`` keeps the last of two equal keys and accepts ``NaN`` and
``Infinity``.  In input that decides what a node does, a field given twice is
ambiguous and those constants are not JSON (RFC 8259), so both are refused
with a :class:`ValueError` naming them; callers turn it into their own error
(a command result, an HTTP 400).
"""

from __future__ import annotations

import json
from typing import Any

ECHO_LIMIT = 64  # characters of a caller's text echoed in an error


def loads(text: str | bytes) -> Any:
    """Decode; :class:`ValueError` (or ``RecursionError`` for absurd nesting) if not JSON."""
    return json.loads(text, object_pairs_hook=_unique_fields, parse_constant=_not_json)


def type_name(value: Any) -> str:
    """The JSON name of a decoded value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def clip(text: str, limit: int = ECHO_LIMIT) -> str:
    """A caller's text echoed in an error, cut so a reply or log line stays small."""
    return text if len(text) <= limit else text[:limit] + "..."


def _unique_fields(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for name, value in pairs:
        if name in doc:
            raise ValueError(f"field {clip(name)!r} given twice")
        doc[name] = value
    return doc


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")
