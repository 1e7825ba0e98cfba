"""Pieces of Redis key names shared by the stores and the admission logic that names buckets."""

from __future__ import annotations

import hashlib


def short_hash(text: str) -> str:
    """The first 16 hex digits of SHA-256: ids in key names, never the ids (or secrets) themselves,
    and no `{` that could move a Redis Cluster slot."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]
