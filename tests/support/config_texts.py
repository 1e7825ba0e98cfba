"""The smallest valid config, as text, for tests that load variants of it: one key (`alice`,
key `alice-demo-key`) on plan `free`, an upstream, the plan's limits and the routes given."""

from __future__ import annotations

_PREFIX = """\
upstream:
  url: http://127.0.0.1:9000
keys:
  - id: alice
    key: alice-demo-key
    plan: free
plans:
  free:
    limits:
"""


def minimal_config(*limits: str, routes: str = "  - path: /v1/**\n    limits: [rpm]\n") -> str:
    """`limits`: the plan's limit lines (`rpm: {rate: 10/1m}` by default); `routes`: the
    text under `routes:` (a route on `/v1/**` limited by `rpm` by default; "" for none)."""
    lines = limits or ("rpm: {rate: 10/1m}",)
    return _PREFIX + "".join(f"      {line}\n" for line in lines) + "routes:\n" + routes
