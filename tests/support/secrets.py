"""Secret values for tests. Every one contains SENTINEL, so a sweep of every log, metric,
Redis key name and upstream request can prove none of them ever leaked
(tests/zz_audit/test_no_secret_leaks.py runs last)."""

from __future__ import annotations

MARK = "SENTINEL"


def secret(name: str) -> str:
    return f"sk-{MARK}-{name}-7f3a9c"
