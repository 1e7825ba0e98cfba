"""Gateways on every Redis topology the SPEC names, under load: Cluster (two gateways sharing a
3-primary cluster, limits exact, scripts flushed mid-load; a primary failed over to its replica
mid-load), Sentinel (a failover mid-load),
and standalone with its script cache flushed again and again. Restarts of a standalone Redis
are in test_store_outage.py (kill_and_restart)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from redis.crc import key_slot

from gateway.admission.buckets import hash_tag
from gateway.admission.identity import hash_key
from gateway.config.model import Key
from tests.faults.conftest import (
    BIG_KEY,
    PREFIX,
    SLACK,
    STORE_TIMEOUT,
    fault_config,
    gateway_for,
    get,
    readyz,
    upstream_stats,
)
from tests.support.invariants import assert_no_leaks, max_in_window
from tests.support.load import Load, metric, run_load
from tests.support.redis_server import private_redis
from tests.support.secrets import secret
from tests.support.topologies import node_for_slot, redis_cluster, sentinel_group

pytestmark = [pytest.mark.redis, pytest.mark.e2e]

FALLBACKS = "gateway_store_fallback_decisions_total"
STORE_ERRORS = "gateway_store_errors_total"


def test_script_flush_under_load_is_invisible(tmp_path: Path, fresh_upstream: str) -> None:
    """`on_error: deny` makes any store failure a visible 503: there must be none."""
    with private_redis() as server, server.client() as direct:
        with gateway_for(tmp_path, fault_config(fresh_upstream, server.url, on_error="deny")) as gw:
            get(gw, BIG_KEY)

            async def flush_every_200ms(load: Load) -> int:
                running = asyncio.ensure_future(
                    run_load([gw.url], BIG_KEY, clients=8, duration=2.0, load=load))
                flushes = 0
                while not running.done():
                    await asyncio.sleep(0.2)
                    await asyncio.to_thread(direct.script_flush)
                    flushes += 1
                await running
                return flushes

            load = Load()
            flushes = asyncio.run(flush_every_200ms(load))
            fallbacks = metric(gw.admin_url, FALLBACKS)
            errors = metric(gw.admin_url, STORE_ERRORS)
        assert flushes >= 8
        assert load.statuses() == {200: len(load.samples)}, load.statuses()
        assert fallbacks == 0 and errors == 0
        evalsha = int(direct.info("commandstats")["cmdstat_evalsha"]["calls"])
        assert evalsha >= len(load.samples)  # every request was decided by Redis
        assert_no_leaks(direct, PREFIX)


def _keys_on_every_node(name: str, per_node: int) -> list[Key]:
    """Keys whose hash tags land on each of the three primaries, `per_node` each."""
    found: dict[int, list[Key]] = {0: [], 1: [], 2: []}
    n = 0
    while any(len(keys) < per_node for keys in found.values()):
        key = Key(f"{name}{n}", hash_key(secret(f"{name}{n}")), "cluster")
        node = node_for_slot(key_slot(hash_tag(PREFIX, key).encode()))
        if len(found[node]) < per_node:
            found[node].append(key)
        n += 1
    return [key for keys in found.values() for key in keys]


def test_two_gateways_share_a_cluster_exactly(tmp_path: Path, fresh_upstream: str) -> None:
    """Two gateways, one 3-primary cluster, keys on every primary: concurrency and sliding
    windows exact across both gateways, while every primary's script cache is flushed twice."""
    slot_keys, rate_keys = _keys_on_every_node("slots", 1), _keys_on_every_node("rate", 1)
    with redis_cluster() as nodes:
        url = "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in nodes[:2])
        config: dict[str, Any] = fault_config(fresh_upstream, url, on_error="deny")
        config["keys"] = [{"id": k.id, "sha256": k.sha256, "plan": "cluster"} for k in slot_keys + rate_keys]
        config["plans"] = {
            "cluster": {"limits": {"burst": {"rate": "10/2s"}, "requests": {"concurrency": 3}}}
        }
        config["routes"] = [{"path": "/hold", "limits": ["requests"]}, {"path": "/**", "limits": ["burst"]}]
        with gateway_for(tmp_path, config, "a") as a, gateway_for(tmp_path, config, "b") as b:

            async def scenario() -> list[Load]:
                urls = [a.url, b.url]
                runs = [run_load(urls, secret(k.id), clients=8, duration=2.5, path="/hold?ms=100")
                        for k in slot_keys]
                runs += [run_load(urls, secret(k.id), clients=4, duration=2.5) for k in rate_keys]
                running = asyncio.gather(*runs)
                for _ in range(2):
                    await asyncio.sleep(0.8)
                    for node in nodes:  # what a failover to a fresh primary looks like
                        with node.client() as client:
                            await asyncio.to_thread(client.script_flush)
                return await running

            loads = asyncio.run(scenario())
            problems = sum(
                metric(gw.admin_url, FALLBACKS) + metric(gw.admin_url, STORE_ERRORS) for gw in (a, b)
            )
        for node in nodes:  # both gateways stopped: every slot they took was released
            with node.client() as client:
                assert_no_leaks(client, PREFIX)
    stats = {key.id: upstream_stats(fresh_upstream, key.id) for key in slot_keys + rate_keys}
    assert problems == 0
    for key, load in zip(slot_keys + rate_keys, loads, strict=True):
        statuses = load.statuses()
        assert set(statuses) <= {200, 429}, (key.id, statuses)
        assert stats[key.id]["total"] == statuses[200]
    for key in slot_keys:
        assert stats[key.id]["max_in_flight"] == 3, key.id  # reached, never exceeded
    for key in rate_keys:
        arrivals = stats[key.id]["arrivals"]
        assert max_in_window(arrivals, 2.0 - 0.1) <= 10, key.id
        assert len(arrivals) >= 10 * int((max(arrivals) - min(arrivals)) // 2.0)  # the budget was used


@pytest.mark.parametrize("how", ["sentinel_failover", "master_killed"])
def test_sentinel_failover_under_load(how: str, tmp_path: Path, fresh_upstream: str) -> None:
    """A failover while 8 clients load one gateway: forced (SENTINEL FAILOVER, the old master
    alive) or because the master died (the Sentinels agree, then promote; `on_error: local`
    covers the gap). No error reaches a client, and admission ends up on the new master only."""
    with sentinel_group() as group:
        if how == "master_killed":
            group.wait_for_quorum()
        with gateway_for(tmp_path, fault_config(fresh_upstream, group.url, on_error="local")) as gw:
            get(gw, BIG_KEY)
            old, new = group.master, group.replica

            async def scenario(load: Load) -> float:
                running = asyncio.ensure_future(
                    run_load([gw.url], BIG_KEY, clients=8, duration=3.0, load=load))
                await asyncio.sleep(0.8)
                await asyncio.to_thread(group.failover if how == "sentinel_failover" else group.kill_master)
                switched = time.monotonic()
                await running
                return switched

            load = Load()
            switched = asyncio.run(scenario(load))
            with new.client() as client:
                before = int(client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))
            settled = time.monotonic()
            while True:  # no permanent error: the store decides again, on the new master
                fallbacks = metric(gw.admin_url, FALLBACKS)
                for _ in range(5):
                    assert get(gw, BIG_KEY).status_code == 200
                if metric(gw.admin_url, FALLBACKS) == fallbacks:
                    break
                assert time.monotonic() - settled < 15, "the gateway never settled on the new master"
                time.sleep(0.2)
            with new.client() as client:
                after = int(client.info("commandstats")["cmdstat_evalsha"]["calls"])
            if how == "sentinel_failover":
                # No split brain: the old master still thinks it is one (Sentinel demotes it
                # ~10 s later), but the gateway no longer writes there.
                with old.client() as client:
                    old_calls = client.info("commandstats")["cmdstat_evalsha"]["calls"]
                    for _ in range(10):
                        assert get(gw, BIG_KEY).status_code == 200
                    assert client.info("commandstats")["cmdstat_evalsha"]["calls"] == old_calls
            status, body = readyz(gw)
            fallbacks = metric(gw.admin_url, FALLBACKS)
            print(f"\n[{how}] failover done at +{switched - load.samples[0].started:.1f}s; "
                  f"{fallbacks:.0f} fallback decisions; max latency {load.max_latency() * 1000:.0f} ms")
        assert load.statuses() == {200: len(load.samples)}, load.statuses()
        assert load.max_latency() < STORE_TIMEOUT + SLACK
        assert after >= before + 5
        assert (status, body["status"]) == (200, "ready")
        if how == "master_killed":
            assert fallbacks > 0  # the gap, covered by on_error: local


def test_cluster_primary_failed_over_under_load(tmp_path: Path, fresh_upstream: str) -> None:
    """`CLUSTER FAILOVER` on the replica of a primary while two gateways load keys on every
    primary (`on_error: deny`, so every failed decision is a counted 503): limits exact across
    the failover, the errors bounded and reported, nothing left on any node."""
    from tests.support.cluster_replicas import redis_cluster_with_replicas

    slot_keys, rate_keys = _keys_on_every_node("fslots", 1), _keys_on_every_node("frate", 1)
    with redis_cluster_with_replicas() as cluster:
        url = "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in cluster.primaries[:2])
        config: dict[str, Any] = fault_config(fresh_upstream, url, on_error="deny")
        config["keys"] = [{"id": k.id, "sha256": k.sha256, "plan": "cluster"} for k in slot_keys + rate_keys]
        config["plans"] = {
            "cluster": {"limits": {"burst": {"rate": "10/2s"}, "requests": {"concurrency": 3}}}
        }
        config["routes"] = [{"path": "/hold", "limits": ["requests"]}, {"path": "/**", "limits": ["burst"]}]
        with gateway_for(tmp_path, config, "a") as a, gateway_for(tmp_path, config, "b") as b:

            async def scenario() -> tuple[list[Load], float]:
                urls = [a.url, b.url]
                runs = [run_load(urls, secret(k.id), clients=8, duration=3.0, path="/hold?ms=100")
                        for k in slot_keys]
                runs += [run_load(urls, secret(k.id), clients=4, duration=3.0) for k in rate_keys]
                running = asyncio.gather(*runs)
                await asyncio.sleep(1.0)
                took = await asyncio.to_thread(cluster.fail_over, 0)
                return await running, took

            loads, took = asyncio.run(scenario())
            fallbacks = sum(metric(gw.admin_url, FALLBACKS) for gw in (a, b))
            errors = sum(metric(gw.admin_url, STORE_ERRORS) for gw in (a, b))
        primaries = [node for node in cluster.nodes if node.client().info("replication")["role"] == "master"]
        assert len(primaries) == 3 and cluster.replicas[0] in primaries
        with cluster.replicas[0].client() as promoted:  # the load went on through the new primary
            decided_there = int(promoted.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))
        assert decided_there > 0
        for node in primaries:  # both gateways stopped: every slot they took was released
            with node.client() as client:
                assert_no_leaks(client, PREFIX)
    stats = {key.id: upstream_stats(fresh_upstream, key.id) for key in slot_keys + rate_keys}
    answered = sum(len(load.samples) for load in loads)
    refused_503 = sum(load.statuses().get(503, 0) for load in loads)
    print(f"\n[cluster failover] promoted in {took * 1000:.0f} ms; {answered} requests, {refused_503} answered "
          f"503 store_unavailable, {fallbacks:.0f} fallback decisions, {errors:.0f} store errors; "
          f"{decided_there} EVALSHA on the new primary")
    for key, load in zip(slot_keys + rate_keys, loads, strict=True):
        statuses = load.statuses()
        assert set(statuses) <= {200, 429, 503}, (key.id, statuses)
        assert stats[key.id]["total"] == statuses[200]
    for key in slot_keys:
        assert stats[key.id]["max_in_flight"] <= 3, key.id  # never exceeded across the failover
    for key in rate_keys:
        assert max_in_window(stats[key.id]["arrivals"], 2.0 - 0.1) <= 10, key.id
    assert refused_503 == fallbacks  # every failed decision is a counted 503, nothing else
    assert refused_503 <= 0.05 * answered  # bounded: the failover costs a moment, not the run
