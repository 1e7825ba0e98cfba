"""Keys of one workspace must agree on what each `scope: workspace` limit is. Pure.

A workspace-scoped limit is one bucket shared by every key of the workspace (its store name
carries the limit name, not the plan, number or window: gateway/admission/buckets.py). Keys
of one workspace on plans that define the same workspace limit differently would share one
log that each caller trims with its own window and counts against its own number: neither
plan's limit would hold (rpm 5/1h and 5/10s: the 1h key was admitted 12 times in 120 s). So
the config is refused, naming the key, its plan and the plan it disagrees with.

"Differently" is any of: the kind (rate, concurrency, quota), the number, the window or
period, `exact`, `counts`, `shadow`. `wait` and a quota's `status` may differ (they say how a
request waits or is refused, not what the bucket holds). A plan that makes the
limit `scope: key` does not share the bucket, and does not conflict.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import yaml

from gateway.config.model import ConcurrencyLimit, Key, Limit, Plan, QuotaLimit, RateLimit
from gateway.config.nodes import Node, NodeReader
from gateway.config.units import format_rate, quote


def _meaning(limit: Limit) -> tuple[object, ...]:
    if isinstance(limit, RateLimit):
        return ("rate", limit.limit, limit.window, limit.exact, limit.counts, limit.shadow)
    if isinstance(limit, QuotaLimit):
        return ("quota", limit.limit, limit.period, limit.counts, limit.shadow)
    return ("concurrency", limit.limit, limit.shadow)


def _describe(limit: Limit) -> str:
    options = []
    if isinstance(limit, RateLimit):
        text = f"rate {format_rate(limit.limit, limit.window)}"
        options += [] if limit.exact else ["exact: false"]
        options += ["counts: cost"] if limit.counts == "cost" else []
    elif isinstance(limit, QuotaLimit):
        text = f"quota {limit.limit}/{limit.period}"
        options += ["counts: requests"] if limit.counts == "requests" else []
    else:
        assert isinstance(limit, ConcurrencyLimit)
        text = f"concurrency {limit.limit}"
    options += ["shadow: true"] if limit.shadow else []
    return f"{text} ({', '.join(options)})" if options else text


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
