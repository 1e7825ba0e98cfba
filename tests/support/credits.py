"""Issue 18 end-to-end helpers: a ZenRows-style credit config, the mock upstream's copy of its
prices, a deterministic traffic mix, and readers of what the gateway and Redis say.

The mock upstream prices every request with the same rules as the gateway (`PRICING` mirrors
`COST_RULES`), so a test compares what the gateway admitted with what arrived, in units.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import httpx

from gateway.admission.identity import hash_key
from tests.support.secrets import secret

UPSTREAM_COST_HEADER = "X-Upstream-Cost"

# A scraping API's price list: plain 1, JS render 5 (two browser slots), premium proxy 10, both 25.
COST_RULES: list[dict[str, Any]] = [
    {"when": {"query": {"js_render": "true", "premium_proxy": "true"}}, "cost": 25, "slots": 2},
    {"when": {"query": {"js_render": "true"}}, "cost": 5, "slots": 2},
    {"when": {"query": {"premium_proxy": "true"}}, "cost": 10},
    {"when": {"query": {"free": "true"}}, "cost": 0},  # a status check: counted nowhere
    {"cost": 1},
]

# The same rules for the mock upstream (tests/support/mock_upstream.py Pricing).
PRICING: dict[str, Any] = {
    "rules": [{"query": r.get("when", {}).get("query", {}), "cost": r["cost"], "slots": r.get("slots", 1)}
              for r in COST_RULES],
    "cost_header": UPSTREAM_COST_HEADER,
    "success_only": True,
}

# One query per price: cost -> the query that costs it.
QUERIES = {0: "free=true", 1: "", 5: "js_render=true", 10: "premium_proxy=true",
           25: "js_render=true&premium_proxy=true"}


def set_pricing(upstream: str, pricing: dict[str, Any] | None = None) -> None:
    httpx.post(upstream + "/_pricing", json=PRICING if pricing is None else pricing).raise_for_status()


def key_entry(key_id: str, plan: str) -> dict[str, str]:
    return {"id": key_id, "sha256": hash_key(secret(key_id)), "plan": plan}


def credit_config(
    upstream: str,
    store_url: str,
    *,
    prefix: str,
    keys: Sequence[dict[str, str]],
    plans: dict[str, Any],
    limits: Sequence[str],
    success_only: bool = True,
) -> dict[str, Any]:
    """A gateway config with the credit price list on its one route."""
    return {
        "upstream": {"url": upstream, "timeout": "10s", "cost_header": UPSTREAM_COST_HEADER,
                     "charge": "success_only" if success_only else "always"},
        "store": {"url": store_url, "prefix": prefix, "timeout": "500ms", "lease": "5s", "on_error": "deny"},
        "usage_path": "/v1/usage",
        "keys": list(keys),
        "plans": plans,
        "routes": [{"path": "/**", "limits": list(limits), "cost": COST_RULES}],
    }


def path_for(cost: int, path: str = "/", extra: str = "") -> str:
    query = "&".join(part for part in (QUERIES[cost], extra) if part)
    return f"{path}?{query}" if query else path


def mix(seed: int, count: int, weights: Sequence[int] = (4, 3, 2, 1)) -> list[int]:
    """A deterministic list of request costs drawn from 1/5/10/25 with `weights`."""
    rng = random.Random(seed)
    return rng.choices([1, 5, 10, 25], weights=weights, k=count)


# -- what the upstream saw ------------------------------------------------------------------


def max_units_in_window(arrivals: Sequence[float], units: Sequence[int], window: float) -> int:
    """The most units arriving inside any half-open interval of `window` seconds."""
    pairs = sorted(zip(arrivals, units, strict=True))
    best = total = start = 0
    for t, u in pairs:
        total += u
        while t - pairs[start][0] >= window:
            total -= pairs[start][1]
            start += 1
        best = max(best, total)
    return best


# -- what the gateway says ------------------------------------------------------------------

_ITEM = re.compile(r'"([^"]+)"((?:;[a-z]+=[^,;]+)*)')


def ietf_items(value: str | None) -> dict[str, dict[str, str]]:
    """`RateLimit` / `RateLimit-Policy` items: name -> {param: value}."""
    items: dict[str, dict[str, str]] = {}
    for name, params in _ITEM.findall(value or ""):
        items[name] = dict(p.split("=", 1) for p in params.strip(";").split(";") if p)
    return items


def seconds_to_utc_midnight(now: float | None = None) -> float:
    moment = dt.datetime.fromtimestamp(time.time() if now is None else now, dt.UTC)
    midnight = (moment + dt.timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return (midnight - moment).total_seconds()


def admin_bucket(admin_url: str, key_id: str, name: str, token: str | None = None) -> dict[str, Any]:
    """The admin view's bucket of limit `name` (GET /v1/keys/{id})."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    view = httpx.get(f"{admin_url}/v1/keys/{key_id}", headers=headers, timeout=5).json()
    found = [b for b in view["buckets"] if b["policy"] == name]
    assert len(found) == 1, (name, view["buckets"])
    return dict(found[0])


def metric_lines(admin_url: str, name: str) -> list[str]:
    text = httpx.get(admin_url + "/metrics", timeout=5).text
    return [line for line in text.splitlines() if line.startswith(name + "{") or line.startswith(name + " ")]


# -- load ----------------------------------------------------------------------------------


@dataclass
class Answer:
    cost: int  # what the client asked for (the price of its query)
    status: int
    headers: dict[str, str]
    body: dict[str, Any] | None
    started: float = 0.0  # time.monotonic() when sent
    received_wall: float = 0.0  # time.time() when answered (Retry-After counts from then)


@dataclass
class Traffic:
    answers: list[Answer] = field(default_factory=list)

    def by_status(self, status: int) -> list[Answer]:
        return [a for a in self.answers if a.status == status]

    def units(self, status: int = 200) -> int:
        return sum(a.cost for a in self.by_status(status))


async def drive(
    urls: Sequence[str],
    api_key: str,
    *,
    clients: int,
    duration: float,
    seed: int,
    path: str = "/",
    extra: str = "",
    weights: Sequence[int] = (4, 3, 2, 1),
    variants: Sequence[str] = ("",),
) -> Traffic:
    """`clients` concurrent closed loops for `duration` seconds, round-robin over `urls`, each
    asking for a seeded random price (1/5/10/25) per request, with one of `variants` (extra
    query, e.g. `declare=2`) added."""
    traffic = Traffic()
    deadline = time.monotonic() + duration
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=20)) as session:

        async def client(n: int) -> None:
            rng = random.Random(seed * 1000 + n)
            i = n
            while time.monotonic() < deadline:
                cost = rng.choices([1, 5, 10, 25], weights=weights)[0]
                more = "&".join(part for part in (extra, rng.choice(variants)) if part)
                url = urls[i % len(urls)] + path_for(cost, path, more)
                i += 1
                started = time.monotonic()
                async with session.get(url, headers={"X-API-Key": api_key}) as response:
                    raw = await response.read()
                    body = None
                    if response.content_type == "application/json" and response.status != 200:
                        body = await response.json()
                    traffic.answers.append(Answer(
                        cost, response.status, {k.lower(): v for k, v in response.headers.items()}, body, started,
                        time.time()))
                    del raw
                if response.status in (402, 429):
                    await asyncio.sleep(0.005)  # a refused client backs off a little, as real ones do

        await asyncio.gather(*(client(n) for n in range(clients)))
    return traffic
