"""The `keys:` section: API keys, each with a public id, the SHA-256 of its secret and a plan.

A plain `key:` (for development) is hashed here and never kept. Ids and secrets must be
unique: a second key with the same secret could never be told apart from the first.
"""

from __future__ import annotations

import hashlib
import re

from gateway.config.model import Key, Limit, RateLimit
from gateway.config.nodes import Entries, Node, NodeReader, did_you_mean, field
from gateway.config.plans import MAX_LOG_UNITS, PlanIndex
from gateway.config.units import MAX_COUNT, quote

_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_PRINTABLE = re.compile(r"[\x21-\x7e]+")


def read_keys(r: NodeReader, node: Node, index: PlanIndex) -> tuple[Key, ...]:
    items = r.sequence(node, "keys")
    if items is None:
        return ()
    if not items:
        r.problem(node, "keys", "must list at least one key")
    seen = _Seen()
    keys = (_key(r, item, f"keys[{position}]", index, seen) for position, item in enumerate(items))
    return tuple(key for key in keys if key is not None)


class _Seen:
    """Ids and secret digests of the keys read so far, each with the path of its first key."""

    def __init__(self) -> None:
        self.ids: dict[str, str] = {}
        self.secrets: dict[str, str] = {}


def _key(r: NodeReader, node: Node, path: str, index: PlanIndex, seen: _Seen) -> Key | None:
    m = r.mapping(node, path, ("id", "sha256", "key", "plan", "workspace", "limits"), required=("id", "plan"))
    if m is None:
        return None
    key_id = field(m, "id", lambda n: r.identifier(n, f"{path}.id"), None)
    if key_id is not None:
        if key_id in seen.ids:
            r.problem(m["id"][1], f"{path}.id", f"duplicate id {quote(key_id)} (first in {seen.ids[key_id]})")
        seen.ids.setdefault(key_id, path)
    digest = _secret(r, node, m, path)
    if digest is not None:
        if digest in seen.secrets:
            where = m["sha256"][1] if "sha256" in m else m["key"][1]
            first = seen.secrets[digest]
            r.problem(where, path, f"the same secret as {first}; this key could never be used")
        seen.secrets.setdefault(digest, path)
    plan = field(m, "plan", lambda n: r.string(n, f"{path}.plan"), None)
    if plan is not None and index.readable and plan not in index.plans:
        r.problem(
            m["plan"][1], f"{path}.plan", f"unknown plan {quote(plan)}{did_you_mean(plan, index.plans)}"
        )
    workspace = field(m, "workspace", lambda n: r.identifier(n, f"{path}.workspace"), None)
    overrides: dict[str, int] = field(
        m, "limits", lambda n: _overrides(r, n, f"{path}.limits", plan, index), {}
    )
    if key_id is None or digest is None or plan is None:
        return None
    return Key(id=key_id, sha256=digest, plan=plan, workspace=workspace, overrides=overrides)


def _secret(r: NodeReader, node: Node, m: Entries, path: str) -> str | None:
    """The lowercase hex SHA-256 of the key's secret, from `sha256:` or a plain `key:`."""
    if "sha256" in m and "key" in m:
        r.problem(m["key"][0], path, 'has both "sha256" and "key"; give one')
        return None
    if "sha256" in m:
        digest = r.string(m["sha256"][1], f"{path}.sha256")
        if digest is not None and not _SHA256.fullmatch(digest.strip()):
            r.problem(m["sha256"][1], f"{path}.sha256", "must be 64 hex digits (see `gateway hash-key`)")
            return None
        return None if digest is None else digest.strip().lower()
    if "key" in m:
        secret = r.string(m["key"][1], f"{path}.key")
        if secret is not None and not _PRINTABLE.fullmatch(secret):
            r.problem(m["key"][1], f"{path}.key", "must be printable ASCII without spaces")
            return None
        return None if secret is None else hashlib.sha256(secret.encode("ascii")).hexdigest()
    r.problem(node, path, 'needs "sha256" (or "key" in plain text, for development)')
    return None


def _overrides(
    r: NodeReader, node: Node, path: str, plan: str | None, index: PlanIndex
) -> dict[str, int] | None:
    """Per-key numbers by limit name; each name must be a limit of the key's plan."""
    entries = r.mapping(node, path)
    if entries is None:
        return None
    known = index.declared.get(plan) if plan is not None else None
    overrides: dict[str, int] = {}
    for name, (key_node, value_node) in entries.items():
        limit_path = f"{path}.{name}"
        if known is not None and name not in known:
            hint = did_you_mean(name, known)
            r.problem(key_node, limit_path, f"plan {quote(plan)} has no limit {quote(name)}{hint}")
            continue
        limit = index.plans[plan].limits.get(name) if plan in index.plans else None
        number = r.integer(value_node, limit_path, 1, _most(limit))
        if number is not None:
            overrides[name] = number
    return overrides


def _most(limit: Limit | None) -> int:
    """The largest override a limit takes."""
    if isinstance(limit, RateLimit) and limit.exact and limit.counts == "cost":
        return MAX_LOG_UNITS
    return MAX_COUNT
