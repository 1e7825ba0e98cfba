"""Redis topologies on loopback from the Debian redis-server binary: a 3-primary Cluster and a
Sentinel group (master, replica, three Sentinels). Every process is stopped by its own PID."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import redis

from tests.support.redis_server import PrivateRedis, free_port, private_redis

CLUSTER_RANGES = [(0, 5460), (5461, 10922), (10923, 16383)]


def _wait(condition: Callable[[], bool], what: str, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            if condition():
                return
        except redis.RedisError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {within}s")
        time.sleep(0.05)


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free and valid too."""
    while True:
        port = random.randint(20000, 50000)
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port


@contextlib.contextmanager
def redis_cluster() -> Iterator[list[PrivateRedis]]:
    """Three primaries, no replicas, slots split evenly (nodes[i] serves CLUSTER_RANGES[i])."""
    with contextlib.ExitStack() as stack:
        nodes = [
            stack.enter_context(private_redis(
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "1000", port=cluster_port(),
            ))
            for _ in range(3)
        ]
        for node, (first, last) in zip(nodes, CLUSTER_RANGES, strict=True):
            with node.client() as client:
                client.execute_command("CLUSTER ADDSLOTSRANGE", first, last)
        with nodes[0].client() as first_node:
            for node in nodes[1:]:
                first_node.execute_command("CLUSTER MEET", "127.0.0.1", node.port)

        def formed() -> bool:
            for node in nodes:
                with node.client() as client:
                    info = client.execute_command("CLUSTER INFO")
                if info["cluster_state"] != "ok" or info["cluster_known_nodes"] != "3":
                    return False
            return True

        _wait(formed, "the cluster forming")
        yield nodes


def node_for_slot(slot: int) -> int:
    return next(i for i, (first, last) in enumerate(CLUSTER_RANGES) if first <= slot <= last)


@dataclass
class SentinelGroup:
    master: PrivateRedis
    replica: PrivateRedis
    sentinel_ports: list[int]
    service: str

    @property
    def url(self) -> str:
        nodes = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{nodes}/{self.service}"

    def master_port(self) -> int:
        with redis.Redis(port=self.sentinel_ports[0], socket_timeout=1) as sentinel:
            _, port = sentinel.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
        return int(port)

    def failover(self) -> None:
        """Promote the replica (as if the master had failed) and wait until it is the master."""
        old = self.master_port()
        with redis.Redis(port=self.sentinel_ports[0], socket_timeout=2) as sentinel:
            sentinel.execute_command("SENTINEL", "FAILOVER", self.service)
        _wait(lambda: self.master_port() != old, "the Sentinel failover", within=20)

    def kill_master(self) -> None:
        """The master dies: the Sentinels agree it is down and promote the replica."""
        self.wait_for_quorum()
        self.master.stop()
        _wait(lambda: self.master_port() == self.replica.port, "the Sentinels' failover", within=20)

    def wait_for_quorum(self) -> None:
        """Every Sentinel knows the two others (needed to agree that the master is down)."""

        def all_known() -> bool:
            for port in self.sentinel_ports:
                with redis.Redis(port=port, socket_timeout=1) as sentinel:
                    if int(sentinel.sentinel_master(self.service)["num-other-sentinels"]) != 2:
                        return False
            return True

        _wait(all_known, "the Sentinels discovering each other", within=20)


def _start_sentinel(master_port: int, service: str) -> tuple[int, subprocess.Popen[bytes], str]:
    workdir = tempfile.mkdtemp(prefix="gw-sentinel-")
    port = free_port()
    config = os.path.join(workdir, "sentinel.conf")
    with open(config, "w") as file:
        file.write(
            f"port {port}\nbind 127.0.0.1\ndir {workdir}\n"
            f"sentinel monitor {service} 127.0.0.1 {master_port} 2\n"
            f"sentinel down-after-milliseconds {service} 1000\n"
            f"sentinel failover-timeout {service} 4000\n"
            f"sentinel parallel-syncs {service} 1\n"
        )
    process = subprocess.Popen(["redis-server", config, "--sentinel"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return port, process, workdir


@contextlib.contextmanager
def sentinel_group(service: str = "gwmaster") -> Iterator[SentinelGroup]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server binary not found")
    with contextlib.ExitStack() as stack:
        master = stack.enter_context(private_redis("--repl-diskless-sync-delay", "0"))
        replica = stack.enter_context(private_redis("--replicaof", "127.0.0.1", str(master.port)))

        def replicating() -> bool:
            with replica.client() as client:
                return client.info("replication").get("master_link_status") == "up"

        _wait(replicating, "replication")
        sentinels = [_start_sentinel(master.port, service) for _ in range(3)]
        for _, process, workdir in sentinels:
            stack.callback(shutil.rmtree, workdir, ignore_errors=True)
            stack.callback(process.wait, 5)
            stack.callback(process.kill)
        ports = [port for port, _, _ in sentinels]

        def sentinels_ready() -> bool:
            for port in ports:  # all answer; the first (which runs the failover) knows the replica
                with redis.Redis(port=port, socket_timeout=1) as sentinel:
                    sentinel.sentinel_master(service)
            with redis.Redis(port=ports[0], socket_timeout=1) as sentinel:
                return len(sentinel.sentinel_slaves(service)) == 1

        _wait(sentinels_ready, "the Sentinels discovering the replica", within=20)
        yield SentinelGroup(master, replica, ports, service)
