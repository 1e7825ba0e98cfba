"""The SPEC §6 metric catalogue, declared once on an injected registry.

Labels are bounded by configuration: plan names, route patterns, fixed outcome words. Never
a key, a secret or an IP. With `--workers N` the supervisor sets PROMETHEUS_MULTIPROC_DIR
before any worker imports prometheus_client, and `/metrics` aggregates every worker's files.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

NO_PLAN = "-"
NO_ROUTE = "-"

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
# From a fraction of a millisecond (one store round trip) up to several seconds (a `wait:` for a slot).
_ADMISSION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "gateway_requests_total", "Requests by plan, route and admission outcome.",
            ["plan", "route", "outcome"], registry=r,
        )
        self.upstream_responses = Counter(
            "gateway_upstream_responses_total", "Upstream answers by route and status class (or timeout/error).",
            ["route", "code"], registry=r,
        )
        self.request_duration = Histogram(
            "gateway_request_duration_seconds", "Whole request time, from arrival to the last byte sent, for admitted requests.",
            ["route"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.admission_duration = Histogram(
            "gateway_admission_duration_seconds", "Time spent deciding admission: the store call, plus any wait for a slot (wait:).",
            buckets=_ADMISSION_BUCKETS, registry=r,
        )
        self.in_flight = Gauge(
            "gateway_in_flight_requests", "Admitted requests in progress in this gateway.",
            ["plan"], registry=r, multiprocess_mode="livesum",
        )
        self.slots_reclaimed = Counter(
            "gateway_slots_reclaimed_total", "Expired slot leases (dead holders) reclaimed.", registry=r,
        )
        self.leases_lost = Counter(
            "gateway_leases_lost_total", "Leases this gateway still held that had already expired.", registry=r,
        )
        self.bans = Counter("gateway_bans_total", "IP bans imposed.", registry=r)
        self.banned_ips = Gauge(
            "gateway_banned_ips", "IPs (or IPv6 prefixes) banned now.", registry=r, multiprocess_mode="max",
        )
        self.store_errors = Counter(
            "gateway_store_errors_total", "Failed store calls by operation.", ["operation"], registry=r,
        )
        self.fallback_decisions = Counter(
            "gateway_store_fallback_decisions_total", "Admission decisions taken without the store, by on_error mode.",
            ["mode"], registry=r,
        )
        self.config_reloads = Counter(
            "gateway_config_reloads_total", "Configuration reloads by result.", ["result"], registry=r,
        )
        for result in ("success", "error"):  # both series exist from the start, so increase() sees the first
            self.config_reloads.labels(result)

    def exposition(self) -> bytes:
        directory = multiprocess_dir()
        if directory is None:
            return generate_latest(self.registry)
        aggregate = CollectorRegistry()
        MultiProcessCollector(aggregate, path=directory)
        return generate_latest(aggregate)


class MetricsObserver:
    """Adapts Metrics to the store's StoreObserver protocol."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def slots_reclaimed(self, count: int) -> None:
        self._metrics.slots_reclaimed.inc(count)

    def leases_lost(self, count: int) -> None:
        self._metrics.leases_lost.inc(count)

    def store_error(self, operation: str) -> None:
        self._metrics.store_errors.labels(operation).inc()
