"""Scale-out proof: three gateway processes share one 3-primary Redis Cluster behind a
round-robin client. Under concurrent load on 30 keys the limits hold exactly as with one
process (counted by what the upstream receives), nothing leaks, and the keys' counters are
spread over all three primaries."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.crc import key_slot

from gateway.admission.buckets import hash_tag
from gateway.admission.identity import hash_key
from gateway.config.model import Key
from tests.support.invariants import assert_no_leaks_on_cluster, max_in_window
from tests.support.load import Load, metric, run_load
from tests.support.processes import gateway, mock_upstream, write_config
from tests.support.secrets import secret
from tests.support.topologies import CLUSTER_RANGES, node_for_slot, redis_cluster

pytestmark = [pytest.mark.redis, pytest.mark.e2e]

PREFIX = "gwscale"
KEYS = 30
HOT = 10  # the first HOT keys get more clients than slots, so every slot fills
SLOTS, RATE, WINDOW = 3, 10, 2.0
HOLD_MS = 150
DURATION = 6.0
JITTER = 0.1  # upstream arrivals lag the admission decision by a little scheduling noise
WARMUP = secret("scale-warmup")  # opens every gateway's upstream and cluster connections first


def _key_ids() -> list[str]:
    return [f"scale{n}" for n in range(KEYS)]


def _config(upstream: str, store_url: str) -> dict[str, Any]:
    return {
        "upstream": {"url": upstream, "timeout": "10s", "max_connections": 128},
        "store": {"url": store_url, "prefix": PREFIX, "timeout": "500ms", "lease": "5s", "on_error": "deny"},
        "keys": [{"id": kid, "sha256": hash_key(secret(kid)), "plan": "p"} for kid in _key_ids()]
        + [{"id": "warmup", "sha256": hash_key(WARMUP), "plan": "warmup"}],
        "plans": {"warmup": {"limits": {"hourly": {"rate": "1000000/1h"}}},
                  "p": {"limits": {"requests": {"concurrency": SLOTS}, "burst": {"rate": f"{RATE}/2s"},
                                 # never refuses; its counters outlive the run (TTL one hour)
                                 "hourly": {"rate": "1000000/1h"}}}},
        "routes": [{"path": "/**", "limits": ["requests", "burst", "hourly"]}],
    }


def _node_of(key_id: str) -> int:
    """Which primary serves every store key of `key_id` (they share one hash tag)."""
    tag = hash_tag(PREFIX, Key(key_id, hash_key(secret(key_id)), "p"))
    return node_for_slot(key_slot(tag.encode()))


def test_three_gateways_on_a_cluster_hold_the_limits_exactly(tmp_path: Path) -> None:
    expected_nodes = {kid: _node_of(kid) for kid in _key_ids()}
    assert set(expected_nodes.values()) == {0, 1, 2}  # the ids chosen do cover every primary
    with redis_cluster() as nodes, mock_upstream() as upstream:
        store_url = "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in nodes)
        config = write_config(tmp_path / "gw.yaml", _config(upstream, store_url))
        with contextlib.ExitStack() as stack:
            gateways = [stack.enter_context(gateway(config)) for _ in range(3)]
            urls = [gw.url for gw in gateways]

            async def warm_up() -> None:
                # New connections (to the upstream, to each primary) add latency between the
                # admission and the upstream arrival of the very first requests: open them first.
                await asyncio.gather(*(run_load([url], WARMUP, clients=40, duration=0.5) for url in urls))

            asyncio.run(warm_up())
            httpx.post(upstream + "/_reset").raise_for_status()
            warm = [metric(gw.admin_url, "gateway_requests_total") for gw in gateways]

            async def scenario() -> list[Load]:
                return await asyncio.gather(*(
                    run_load(urls, secret(kid), clients=4 if n < HOT else 2, duration=DURATION,
                             path=f"/hold?ms={HOLD_MS}")
                    for n, kid in enumerate(_key_ids())
                ))

            loads = asyncio.run(scenario())
            stats: dict[str, Any] = httpx.get(upstream + "/_stats").json()["keys"]
            store_errors = sum(metric(gw.admin_url, "gateway_store_errors_total") for gw in gateways)
            fallbacks = sum(metric(gw.admin_url, "gateway_store_fallback_decisions_total") for gw in gateways)
            served_by = [metric(gw.admin_url, "gateway_requests_total") - before
                         for gw, before in zip(gateways, warm, strict=True)]
        # every gateway stopped: every slot any of them took was released, on every primary
        clients = [node.client() for node in nodes]
        held = assert_no_leaks_on_cluster(clients, PREFIX)
        slots_of = [[int(clients[i].execute_command("CLUSTER KEYSLOT", name)) for name in names]
                    for i, names in enumerate(held)]
        for client in clients:
            client.close()

    assert store_errors == 0 and fallbacks == 0  # every decision was the cluster's
    # the round robin spread the load evenly over the three processes
    assert min(served_by) > 0.25 * sum(served_by), served_by
    for n, (kid, load) in enumerate(zip(_key_ids(), loads, strict=True)):
        statuses = load.statuses()
        assert set(statuses) <= {200, 429}, (kid, statuses)
        key_stats = stats[kid]
        assert key_stats["total"] == statuses[200] == key_stats["completed"], kid
        # concurrency: never more than SLOTS at the upstream at once; the hot keys filled them
        assert key_stats["max_in_flight"] <= SLOTS, kid
        if n < HOT:
            assert key_stats["max_in_flight"] == SLOTS, kid
        # sliding window: any RATE + 1 arrivals span at least the window, less the jitter
        arrivals = key_stats["arrivals"]
        assert max_in_window(arrivals, WINDOW - JITTER) <= RATE, kid
        elapsed = max(arrivals) - min(arrivals)
        assert len(arrivals) >= RATE * int(elapsed // WINDOW), kid  # the budget was really used
        assert len(arrivals) <= RATE * (elapsed // WINDOW + 1), kid  # and not one request more
        assert statuses[429] > 0, kid

    # the keys spread: each primary holds counters, each only of its own slots, and every
    # API key's rate counter sits on the primary its hash tag maps to
    assert all(names for names in held), [len(names) for names in held]
    for i, slots in enumerate(slots_of):
        first, last = CLUSTER_RANGES[i]
        assert all(first <= slot <= last for slot in slots), (i, slots)
    for kid, node in expected_nodes.items():
        tag = hash_tag(PREFIX, Key(kid, hash_key(secret(kid)), "p"))
        assert f"{tag}:r:hourly" in held[node], kid
