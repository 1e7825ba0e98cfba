"""The reference reading of a job's dotted path (`data.id`, `items.0.id`) in a parsed JSON
document: what gateway/jobs/scan.py finds while the answer streams, checked against this."""

from __future__ import annotations

from typing import Any


def lookup(document: Any, dotted: str) -> Any:
    """The value at a dotted path (`data.id`; list items by index, `items.0.id`), or None."""
    value = document
    for part in dotted.split("."):
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
        if value is None:
            return None
    return value
