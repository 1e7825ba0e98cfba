"""Shadow limits end to end (issue 18): the same deterministic traffic over two gateway
processes on one Redis, once with the limit `shadow: true`, once enforced. Shadow never
refuses and says nothing in the headers, yet `gateway_shadow_refusals_total` counts exactly the
refusals the enforced limit makes, and the store holds the same units either way."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.support.credits import credit_config, drive, ietf_items, key_entry, mix, path_for, set_pricing
from tests.support.invariants import assert_no_leaks
from tests.support.load import metric
from tests.support.processes import gateway, mock_upstream, write_config
from tests.support.secrets import secret

pytestmark = [pytest.mark.redis, pytest.mark.e2e]

LIMIT = 60
COSTS = mix(seed=18, count=40)  # ~280 units asked for: most of the run is over the limit


def _model(costs: list[int], limit: int) -> tuple[int, int]:
    """(refusals, units admitted) of `count + cost <= limit` over one window or period."""
    used = refused = 0
    for cost in costs:
        if used + cost <= limit:
            used += cost
        else:
            refused += 1
    return refused, used


def _limits(kind: str, shadow: bool) -> dict[str, Any]:
    tested = ({"rate": f"{LIMIT}/1h", "counts": "cost"} if kind == "rate" else {"quota": f"{LIMIT}/1d"})
    return {"tested": tested | {"shadow": shadow}, "rpm": {"rate": "100000/1m"}}


def _run(tmp_path: Path, upstream: str, redis_url: str, kind: str, shadow: bool) -> tuple[list[httpx.Response], int]:
    prefix = f"gwshadow{kind}{int(shadow)}"
    config = write_config(tmp_path / f"{prefix}.yaml", credit_config(
        upstream, redis_url, prefix=prefix, keys=[key_entry("rollout", "rollout")],
        plans={"rollout": {"limits": _limits(kind, shadow)}}, limits=["tested", "rpm"],
    ))
    with gateway(config) as a, gateway(config) as b, httpx.Client(headers={"X-API-Key": secret("rollout")}) as client:
        answers = [client.get((a.url, b.url)[i % 2] + path_for(cost)) for i, cost in enumerate(COSTS)]
        counted = sum(metric(gw.admin_url, "gateway_shadow_refusals_total", plan="rollout", limit="tested")
                      for gw in (a, b))
    return answers, int(counted)


def _units_held(client: redis.Redis, prefix: str) -> int:
    """Units the tested limit holds in Redis: its log's size, or its quota hash's `u`."""
    total = 0
    for name in client.scan_iter(match=f"{prefix}:*", count=1000):
        if name.endswith(b":r:tested"):
            total += int(client.zcard(name))
        elif client.type(name) == b"hash" and client.hexists(name, "u"):
            total += int(client.hget(name, "u") or 0)
    return total


@pytest.mark.parametrize("kind", ["rate", "quota"])
def test_shadow_counts_what_enforcement_refuses(
    tmp_path: Path, redis_url: str, redis_sync: redis.Redis, kind: str
) -> None:
    refusals, admitted_units = _model(COSTS, LIMIT)
    assert refusals >= 10  # the traffic does go over the limit, often
    with mock_upstream() as upstream:
        set_pricing(upstream)
        shadowed, counted = _run(tmp_path, upstream, redis_url, kind, shadow=True)
        shadow_units = _units_held(redis_sync, f"gwshadow{kind}1")
        httpx.post(upstream + "/_reset")
        enforced, enforced_counted = _run(tmp_path, upstream, redis_url, kind, shadow=False)
        enforced_units = _units_held(redis_sync, f"gwshadow{kind}0")
        stats = httpx.get(upstream + "/_stats").json()["keys"]

    # shadow: never refuses, never named in the headers, counts every would-be refusal
    assert [answer.status_code for answer in shadowed] == [200] * len(COSTS)
    for answer in shadowed:
        assert "tested" not in ietf_items(answer.headers.get("ratelimit-policy"))
        assert "tested" not in ietf_items(answer.headers.get("ratelimit"))
        assert answer.headers["x-ratelimit-limit"] == "100000"
    assert counted == refusals
    # enforced: the same refusals, on the same requests, and no shadow counter
    refused = [i for i, answer in enumerate(enforced) if answer.status_code != 200]
    assert len(refused) == refusals and enforced_counted == 0
    assert {enforced[i].status_code for i in refused} == ({429} if kind == "rate" else {402})
    assert stats["rollout"]["units"] == admitted_units
    # "counted exactly as if enforced": the store holds the same units either way
    assert shadow_units == enforced_units == admitted_units


def test_a_shadow_concurrency_limit_never_refuses_under_load(
    tmp_path: Path, redis_url: str, redis_sync: redis.Redis
) -> None:
    """Two shadow slots under eight enforced ones, weighted requests over two processes: only
    the enforced limit refuses, the upstream holds more than the shadow limit at once, the
    shadow counter moves, and neither slot set keeps a member."""
    with mock_upstream() as upstream:
        set_pricing(upstream)
        config = write_config(tmp_path / "gw.yaml", credit_config(
            upstream, redis_url, prefix="gwshadowslots", keys=[key_entry("rollout", "rollout")],
            plans={"rollout": {"limits": {"tight": {"concurrency": 2, "shadow": True},
                                          "browsers": {"concurrency": 8}}}},
            limits=["tight", "browsers"],
        ))
        with gateway(config) as a, gateway(config) as b:
            traffic = asyncio.run(drive([a.url, b.url], secret("rollout"), clients=12, duration=3.0, seed=5,
                                        path="/hold", extra="ms=40"))
            counted = sum(metric(gw.admin_url, "gateway_shadow_refusals_total", plan="rollout", limit="tight")
                          for gw in (a, b))
            seen = httpx.get(upstream + "/_stats").json()["keys"]["rollout"]
        assert_no_leaks(redis_sync, "gwshadowslots")
    refused = [answer.body for answer in traffic.answers if answer.status != 200]
    assert refused and all(body and body["error"] == "concurrency_limited" for body in refused)
    assert 2 < seen["max_slots_in_flight"] <= 8
    assert counted > 0
    for answer in traffic.answers:
        assert "tight" not in ietf_items(answer.headers.get("ratelimit-policy"))
        assert answer.headers.get("concurrency-limit") == "8"
