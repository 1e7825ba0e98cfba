"""A 3-primary Redis Cluster (tests/support/topologies.py) with one replica per primary, so a
primary can be failed over with `CLUSTER FAILOVER` on its replica. Every process is stopped by
its own PID."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import redis

from tests.support.redis_server import PrivateRedis, private_redis
from tests.support.topologies import cluster_port, redis_cluster


@dataclass
class ClusterWithReplicas:
    primaries: list[PrivateRedis]  # primaries[i] serves CLUSTER_RANGES[i] at the start
    replicas: list[PrivateRedis]  # replicas[i] replicates primaries[i]

    @property
    def nodes(self) -> list[PrivateRedis]:
        return self.primaries + self.replicas

    def fail_over(self, index: int, within: float = 15.0) -> float:
        """`CLUSTER FAILOVER` on replicas[index] (coordinated: the old primary stops writes
        until the replica has caught up); returns the seconds until the replica is primary."""
        started = time.monotonic()
        with self.replicas[index].client() as client:
            client.execute_command("CLUSTER FAILOVER")
            while client.info("replication")["role"] != "master":
                if time.monotonic() - started > within:
                    pytest.fail(f"replica {index} not promoted within {within}s")
                time.sleep(0.01)
        return time.monotonic() - started


def _node_id(node: PrivateRedis) -> str:
    with node.client() as client:
        return str(client.execute_command("CLUSTER MYID").decode())


@contextlib.contextmanager
def redis_cluster_with_replicas() -> Iterator[ClusterWithReplicas]:
    with contextlib.ExitStack() as stack:
        primaries = stack.enter_context(redis_cluster())
        replicas = [
            stack.enter_context(private_redis(
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "1000", port=cluster_port(),
            ))
            for _ in primaries
        ]
        with primaries[0].client() as first:
            for replica in replicas:
                first.execute_command("CLUSTER MEET", "127.0.0.1", replica.port)
        deadline = time.monotonic() + 20
        for primary, replica in zip(primaries, replicas, strict=True):
            primary_id = _node_id(primary)
            with replica.client() as client:
                while True:  # the replica must know the primary before it can follow it
                    try:
                        client.execute_command("CLUSTER REPLICATE", primary_id)
                        break
                    except redis.ResponseError:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.05)
        for replica in replicas:
            with replica.client() as client:
                while client.info("replication").get("master_link_status") != "up":
                    if time.monotonic() > deadline:
                        pytest.fail("replicas did not sync within 20s")
                    time.sleep(0.05)
        yield ClusterWithReplicas(list(primaries), replicas)
