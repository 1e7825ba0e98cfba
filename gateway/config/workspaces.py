"""Keys of one workspace must agree on what each `scope: workspace` limit is. Pure.

A workspace-scoped limit is one bucket shared by every key of the workspace (its store name
carries the limit name, not the plan, number or window: gateway/admission/buckets.py). Keys
of one workspace on plans that define the same workspace limit differently would share one
log that each caller trims with its own window and counts against its own number: neither
plan's limit would hold (rpm 5/1h and 5/10s: the 1h key was admitted 12 times in 120 s). So
the config is refused, naming the key, its plan and the plan it disagrees with.

"Differently" is any of: rate vs concurrency, the number, the window, `exact`. `wait` may
differ (it is how long a request waits, not what the bucket holds). A plan that makes the
limit `scope: key` does not share the bucket, and does not conflict.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import yaml

from gateway.config.model import ConcurrencyLimit, Key, Limit, Plan, RateLimit
from gateway.config.nodes import Node, NodeReader
from gateway.config.units import format_rate, quote


def _meaning(limit: Limit) -> tuple[object, ...]:
    if isinstance(limit, RateLimit):
        return ("rate", limit.limit, limit.window, limit.exact)
    return ("concurrency", limit.limit)


def _describe(limit: Limit) -> str:
    if isinstance(limit, RateLimit):
        text = f"rate {format_rate(limit.limit, limit.window)}"
        return text if limit.exact else f"{text} (exact: false)"
    assert isinstance(limit, ConcurrencyLimit)
    return f"concurrency {limit.limit}"


def _plan_nodes(keys_node: Node) -> dict[str, tuple[int, Node]]:
    """key id -> (its position in `keys`, its `plan` value node), for the keys written plainly."""
    found: dict[str, tuple[int, Node]] = {}
    if not isinstance(keys_node, yaml.SequenceNode):
        return found
    for position, item in enumerate(keys_node.value):
        if not isinstance(item, yaml.MappingNode):
            continue
        fields = {k.value: v for k, v in item.value if isinstance(k, yaml.ScalarNode)}
        key_id, plan = fields.get("id"), fields.get("plan")
        if isinstance(key_id, yaml.ScalarNode) and plan is not None:
            found.setdefault(str(key_id.value), (position, plan))
    return found


def check_workspace_limits(r: NodeReader, keys_node: Node, keys: Sequence[Key], plans: Mapping[str, Plan]) -> None:
    """Report every key whose plan defines a workspace limit unlike an earlier key of its
    workspace does (FILE:LINE of the key's `plan`)."""
    nodes = _plan_nodes(keys_node)
    first: dict[tuple[str, str], tuple[Key, Limit]] = {}  # (workspace, limit name) -> first definer
    for key in keys:
        plan = plans.get(key.plan)
        if key.workspace is None or plan is None:
            continue
        for name, limit in plan.limits.items():
            if limit.scope != "workspace":
                continue
            seen = first.setdefault((key.workspace, name), (key, limit))
            other, defined = seen
            if other is key or _meaning(defined) == _meaning(limit):
                continue
            position, node = nodes.get(key.id, (None, keys_node))
            path = f"keys[{position}].plan" if position is not None else "keys"
            r.problem(
                node, path,
                f"plan {quote(key.plan)} makes workspace limit {quote(name)} {_describe(limit)}, but key "
                f"{quote(other.id)} of workspace {quote(key.workspace)} has plan {quote(other.plan)} where it is "
                f"{_describe(defined)}; keys of one workspace share that bucket, so their plans must "
                "define it alike (or put these keys in different workspaces)",
            )  # fmt: skip
