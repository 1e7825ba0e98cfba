"""The SPEC §6 metric catalogue, declared once on an injected registry.

Labels are bounded by configuration: plan names, route patterns, fixed outcome words. Never
a key, a secret or an IP. With `--workers N` the supervisor sets PROMETHEUS_MULTIPROC_DIR
before any worker imports prometheus_client, and `/metrics` aggregates every worker's files.
"""

from __future__ import annotations

import os
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.multiprocess import MultiProcessCollector

NO_PLAN = "-"
NO_ROUTE = "-"

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
# From a fraction of a millisecond (one store round trip) up to several seconds (a `wait:` for a slot).
_ADMISSION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


_Metric = TypeVar("_Metric", bound=MetricWrapperBase)


class Children(Generic[_Metric]):
    """`metric.labels(*values)`, looked up once per distinct label tuple.

    prometheus_client's `labels()` validates and converts the values and takes a lock on every
    call; the hot path calls this instead: one dict lookup. The registry keeps every child it
    made for ever, so keeping them here too bounds this dict by the same label values (bounded
    by configuration); a reload that brings new plans or routes only adds entries, and a child
    once made stays the right one (labels are never removed).
    """

    __slots__ = ("_metric", "_children")

    def __init__(self, metric: _Metric) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], _Metric] = {}

    def __call__(self, *values: str) -> _Metric:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


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
            "gateway_request_duration_seconds",
            "Whole request time, from arrival to the last byte sent, for admitted requests.",
            ["route"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.admission_duration = Histogram(
            "gateway_admission_duration_seconds",
            "Time spent deciding admission: the store call, plus any wait for a slot (wait:).",
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
        self.cached_refusals = Counter(
            "gateway_cached_refusals_total",
            "Rate refusals answered from this process's refusal cache, without a store call.", registry=r,
        )
        for result in ("success", "error"):  # both series exist from the start, so increase() sees the first
            self.config_reloads.labels(result)
        # The labelled children the hot path uses, without a labels() call per request.
        self.requests_for = Children(self.requests)
        self.upstream_responses_for = Children(self.upstream_responses)
        self.request_duration_for = Children(self.request_duration)
        self.in_flight_for = Children(self.in_flight)

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
