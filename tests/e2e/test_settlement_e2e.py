"""Settlement end to end (issue 18): the upstream declares what a request really cost and the
gateway re-prices the admission on Redis, riding the release. A refund, an extra debit, a
`success_only` 500 and an overdraw, each visible in the next request's headers, in the admin
view of the other gateway process, and in what Redis holds."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
import redis

from tests.support.credits import (
    UPSTREAM_COST_HEADER,
    admin_bucket,
    credit_config,
    ietf_items,
    key_entry,
    path_for,
    set_pricing,
)
from tests.support.processes import Proc, gateway, mock_upstream, write_config
from tests.support.secrets import secret

pytestmark = [pytest.mark.redis, pytest.mark.e2e]

PREFIX = "gwsettle"
RATE, QUOTA = 100, 1000


def _plans() -> dict[str, object]:
    return {"metered": {"limits": {
        "credits": {"rate": f"{RATE}/1h", "counts": "cost"},
        "daily": {"quota": f"{QUOTA}/1d"},
    }}}


def store_units(client: redis.Redis) -> tuple[int, int]:
    """(units in the `credits` log, `u` of the quota hash) as Redis holds them."""
    (log,) = list(client.scan_iter(match=f"{PREFIX}:*:r:credits", count=1000))
    quotas = [name for name in client.scan_iter(match=f"{PREFIX}:*", count=1000)
              if client.type(name) == b"hash" and client.hexists(name, "u")]
    assert len(quotas) == 1, quotas
    return int(client.zcard(log)), int(client.hget(quotas[0], "u") or 0)


def admin_used(gw: Proc, used: int, within: float = 2.0) -> tuple[int, int]:
    """(credits used, daily used) in `gw`'s admin view, once both say `used` (a settlement is
    sent off the critical path: another process may read it a moment after the answer)."""
    deadline = time.monotonic() + within
    while True:
        seen = (admin_bucket(gw.admin_url, "settle", "credits")["used"],
                admin_bucket(gw.admin_url, "settle", "daily")["used"])
        if seen == (used, used) or time.monotonic() > deadline:
            return seen
        time.sleep(0.02)


def test_refund_extra_debit_success_only_and_overdraw(
    tmp_path: Path, redis_url: str, redis_sync: redis.Redis
) -> None:
    with mock_upstream() as upstream:
        set_pricing(upstream)
        config = write_config(tmp_path / "gw.yaml", credit_config(
            upstream, redis_url, prefix=PREFIX, keys=[key_entry("settle", "metered")],
            plans=_plans(), limits=["credits", "daily"],
        ))
        with gateway(config) as a, gateway(config) as b, httpx.Client(
            base_url=a.url, headers={"X-API-Key": secret("settle")}
        ) as client:
            used = 0

            def step(path: str, status: int, charged: int) -> None:
                """One request that settles to `charged`, then a plain one (1 unit) whose
                headers must count the settled charge; then the admin view and Redis."""
                nonlocal used
                answer = client.get(path)
                assert answer.status_code == status, answer.text
                assert answer.headers["x-request-cost"] == str(charged), path
                assert UPSTREAM_COST_HEADER.lower() not in answer.headers  # never forwarded
                used += charged
                after = client.get("/")
                assert after.status_code == 200, after.text
                used += 1
                assert after.headers["x-request-cost"] == "1"
                assert after.headers["x-ratelimit-limit"] == str(RATE)
                assert after.headers["x-ratelimit-remaining"] == str(RATE - used), (path, used)
                items = ietf_items(after.headers["ratelimit"])
                assert (items["credits"]["r"], items["daily"]["r"]) == (str(RATE - used), str(QUOTA - used)), path
                policy = ietf_items(after.headers["ratelimit-policy"])
                assert (policy["credits"]["q"], policy["daily"]["q"]) == (str(RATE), str(QUOTA))
                assert admin_used(b, used) == (used, used), path
                assert store_units(redis_sync) == (used, used), path

            step(path_for(5, extra="declare=2"), 200, 2)  # a refund: 5 charged, 2 settled
            step(path_for(1, extra="declare=9"), 200, 9)  # an extra debit: 1 charged, 9 settled
            step(path_for(10, extra="fail=500&declare=4"), 500, 0)  # success_only: a 500 is free
            step(path_for(5, extra="declare=abc"), 200, 5)  # not a number: the price stands
            step(path_for(1, extra="declare=0"), 200, 0)  # declared free
            step(path_for(0), 200, 0)  # a free rule: nothing written
            step(path_for(5, extra="declare=3%2C4"), 200, 3)  # a list: its first value
            step(path_for(5, extra="declare=x&declare=4"), 200, 5)  # two lines: the first, not a number
            step(path_for(0, extra="declare=3"), 200, 3)  # a free rule the upstream bills after all

            # an overdraw: the window goes over its limit, the next request waits for it
            answer = client.get(path_for(1, extra=f"declare={RATE}"))
            assert answer.status_code == 200 and answer.headers["x-request-cost"] == str(RATE)
            used += RATE
            refused = client.get("/")
            assert refused.status_code == 429, refused.text
            assert refused.json()["error"] == "rate_limited"
            assert refused.headers["x-ratelimit-remaining"] == "0"
            assert admin_used(b, used) == (used, used)
            assert store_units(redis_sync) == (used, used)
            stats = httpx.get(upstream + "/_stats").json()["keys"]["settle"]
        assert stats["settled_units"] == used  # the mock's own reckoning agrees
