"""The SPEC §6 metric catalogue, declared once on an injected registry.

Labels are bounded by configuration: plan names, route patterns, fixed outcome words. Never
a key, a secret or an IP. With `--workers N` the supervisor sets PROMETHEUS_MULTIPROC_DIR
before any worker imports prometheus_client, and `/metrics` aggregates every worker's files.

The per-request updates (`requests_for`, `upstream_responses_for`, `request_duration_for`,
`in_flight_for`, `admission_duration`, `cached_refusals`) add to plain numbers and are folded
into prometheus_client once per event-loop iteration (`Batch`); every other metric is updated
directly. `Metrics.flush()` folds what is pending now (`exposition()` calls it; so should a
worker's shutdown).
"""

from __future__ import annotations

import asyncio
import os
from bisect import bisect_left
from collections.abc import Callable
from functools import reduce
from itertools import repeat
from math import isnan
from operator import add
from typing import Generic, Protocol, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.multiprocess import MultiProcessCollector

from gateway.admission.bans import STRIKE_KINDS
from gateway.connection_limits import LIMITS as CONNECTION_LIMITS

NO_PLAN = "-"
NO_ROUTE = "-"

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
# From a fraction of a millisecond (one store round trip) up to several seconds (a `wait:` for a slot).
_ADMISSION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class _Pending(Protocol):
    def fold(self) -> None: ...


class Batch:
    """The hot-path updates of one event-loop iteration, folded into prometheus_client together.

    prometheus_client takes a lock on every `inc` (two per `observe`, plus a validation and a
    bucket scan); the hot path adds to plain numbers in the batched metrics below instead. The
    first one changed in an iteration schedules `flush` with `loop.call_soon` (as the access log
    does), which folds every batched metric changed since. All of them live on the one event-loop
    thread, so none needs a lock. With no running loop (synchronous code) a change folds at once.
    """

    __slots__ = ("_changed",)

    def __init__(self) -> None:
        self._changed: list[_Pending] = []

    def changed(self, pending: _Pending) -> None:
        """`pending` has updates to fold; called once per batched metric between two folds."""
        changed = self._changed
        changed.append(pending)
        if len(changed) == 1:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no event loop (a synchronous caller): fold at once
                self.flush()

    def flush(self) -> None:
        """Fold every pending update; safe to call at any time, also when none is."""
        changed, self._changed = self._changed, []
        for pending in changed:
            pending.fold()


class BatchedCounter:
    """A counter's (or labelled child's) `inc()`, counted here and folded by the batch."""

    __slots__ = ("metric", "_batch", "_count")

    def __init__(self, metric: Counter, batch: Batch) -> None:
        self.metric = metric  # the prometheus_client counter the counts fold into
        self._batch = batch
        self._count = 0

    def inc(self) -> None:
        self._count += 1
        if self._count == 1:
            self._batch.changed(self)

    def add(self, amount: int) -> None:
        """`amount` at once (units charged); 0 is nothing."""
        if amount > 0:
            if self._count == 0:
                self._batch.changed(self)
            self._count += amount

    def fold(self) -> None:
        count, self._count = self._count, 0
        self.metric.inc(count)


class BatchedGauge:
    """A gauge's `inc()`/`dec()`, netted here; the fold applies the net change (often 0)."""

    __slots__ = ("metric", "_batch", "_delta", "_in_batch")

    def __init__(self, metric: Gauge, batch: Batch) -> None:
        self.metric = metric
        self._batch = batch
        self._delta = 0
        self._in_batch = False  # a net change of 0 can still be waiting for its fold

    def inc(self) -> None:
        self._delta += 1
        if not self._in_batch:
            self._in_batch = True
            self._batch.changed(self)

    def dec(self) -> None:
        self._delta -= 1
        if not self._in_batch:
            self._in_batch = True
            self._batch.changed(self)

    def fold(self) -> None:
        delta, self._delta, self._in_batch = self._delta, 0, False
        if delta:
            self.metric.inc(delta)


class BatchedHistogram:
    """A histogram's `observe()`, the amounts kept in order here and folded by the batch."""

    __slots__ = ("metric", "_batch", "_amounts")

    def __init__(self, metric: Histogram, batch: Batch) -> None:
        self.metric = metric
        self._batch = batch
        self._amounts: list[float] = []

    def observe(self, amount: float) -> None:
        amounts = self._amounts
        amounts.append(amount)
        if len(amounts) == 1:
            self._batch.changed(self)

    def fold(self) -> None:
        amounts, self._amounts = self._amounts, []
        observe_all(self.metric, amounts)


def observe_all(histogram: Histogram, amounts: list[float]) -> None:
    """Leave `histogram` as `observe(amount)` for each amount in turn would, with fewer locks.

    Uses prometheus_client internals (as of 0.26; tests/unit/test_metrics_batching.py compares
    the result with real `observe()` calls and fails if they change): `_upper_bounds`, the
    sorted bucket bounds ending in +Inf; `_buckets`, one value per bound counting the amounts
    that fall in it (not cumulative); `_sum`; each value with `get`, `set` and `inc`.
    The per-amount work (the sum, the bucket search and count) runs in C: `reduce` adds one
    amount at a time, in order, as observe() does (`sum()` compensates from 3.12, so it is not used).
    """
    sum_value, bounds, buckets = histogram._sum, histogram._upper_bounds, histogram._buckets
    if len(amounts) == 1:  # common at low load: one lock, where get() and set() take two
        sum_value.inc(amounts[0])
    else:
        sum_value.set(reduce(add, amounts, sum_value.get()))
    if any(map(isnan, amounts)):  # observe() counts a NaN in no bucket (bisect would put it first)
        amounts = [amount for amount in amounts if not isnan(amount)]
    # each amount's bucket: the first bound >= amount (+Inf is last, so one exists)
    indices = list(map(bisect_left, repeat(bounds), amounts))
    for index in set(indices):  # a few distinct buckets: counting each is cheaper than a Counter
        buckets[index].inc(indices.count(index))


_Batched = TypeVar("_Batched", BatchedCounter, BatchedGauge, BatchedHistogram)
_Metric = TypeVar("_Metric", bound=MetricWrapperBase)


class Children(dict[tuple[str, ...], _Batched], Generic[_Metric, _Batched]):
    """`metric.labels(*values)`, looked up once per distinct label tuple, batched.

    prometheus_client's `labels()` validates and converts the values and takes a lock on every
    call; the hot path looks the child's batched metric up here instead: `children[values]`,
    one dict subscript in C (`__missing__` makes a child the first time), or `children(*values)`.
    The registry keeps every child it made for ever, so keeping them here too bounds this dict
    by the same label values (bounded by configuration); a reload that brings new plans or
    routes only adds entries, and a child once made stays the right one (labels are never
    removed).
    """

    __slots__ = ("_metric", "_batched", "_batch")

    def __init__(self, metric: _Metric, batched: Callable[[_Metric, Batch], _Batched], batch: Batch) -> None:
        super().__init__()
        self._metric = metric
        self._batched: Callable[[_Metric, Batch], _Batched] = batched
        self._batch = batch

    def __missing__(self, values: tuple[str, ...]) -> _Batched:
        child = self[values] = self._batched(self._metric.labels(*values), self._batch)
        return child

    def __call__(self, *values: str) -> _Batched:
        return self[values]


class Metrics:
    """The metrics. The hot path's are batched (`Batch`): the `*_for` children,
    `admission_duration` and `cached_refusals`, whose `.metric` is the prometheus_client one."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.batch = Batch()
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
        self.admission_duration = BatchedHistogram(Histogram(
            "gateway_admission_duration_seconds",
            "Time spent deciding admission: the store call, plus any wait for a slot (wait:).",
            buckets=_ADMISSION_BUCKETS, registry=r,
        ), self.batch)
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
        self.ban_strikes = Counter(
            "gateway_ban_strikes_total",
            "Ban strikes by kind: 401s (unauthorized), and 429s that came back before their told wait"
            " (rate, concurrency).",
            ["kind"], registry=r,
        )
        # Indexed by gateway.admission.bans kind (UNAUTHORIZED, RATE, CONCURRENCY); all exist from the start.
        self.ban_strikes_by_kind = [
            BatchedCounter(self.ban_strikes.labels(kind), self.batch) for kind in STRIKE_KINDS
        ]
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
        self.cached_refusals = BatchedCounter(Counter(
            "gateway_cached_refusals_total",
            "Rate refusals answered from this process's refusal cache, without a store call.", registry=r,
        ), self.batch)
        self.client_timeouts = Counter(
            "gateway_client_timeouts_total",
            "Admitted exchanges the gateway ended because the client stalled: its request body "
            "(stage=body) or reading the response (stage=send).", ["stage"], registry=r,
        )
        self.units_charged = Counter(
            "gateway_units_charged_total",
            "Units (request cost) charged to admitted requests, as settled, by plan and route.",
            ["plan", "route"], registry=r,
        )
        self.shadow_refusals = Counter(
            "gateway_shadow_refusals_total",
            "Requests a shadow limit would have refused (it never refuses), by plan and limit.",
            ["plan", "limit"], registry=r,
        )
        self.client_connections = Gauge(
            "gateway_client_connections", "Client connections open on the public port.",
            registry=r, multiprocess_mode="livesum",
        )
        self.connections_refused = Counter(
            "gateway_connections_refused_total",
            "Client connections refused at the accept (503) by the bound they were over: per_client "
            "(max_connections_per_client) or total (max_client_connections; the admin port's own).",
            ["port", "limit"], registry=r,
        )
        self.log_lines_dropped = Counter(
            "gateway_log_lines_dropped_total",
            "Log lines dropped because their stream's reader took no writes while MAX_BACKLOG (8 Mi "
            "characters) waited: stream=stdout (the access log) or stderr (the gateway's log).",
            ["stream"], registry=r,
        )
        for stream in ("stdout", "stderr"):
            self.log_lines_dropped.labels(stream)
        for port in ("public", "admin"):
            for limit in CONNECTION_LIMITS:
                self.connections_refused.labels(port, limit)
        for stage in ("body", "send"):
            self.client_timeouts.labels(stage)
        for result in ("success", "error"):  # both series exist from the start, so increase() sees the first
            self.config_reloads.labels(result)
        # The labelled children the hot path uses, without a labels() call per request.
        self.requests_for = Children(self.requests, BatchedCounter, self.batch)
        self.upstream_responses_for = Children(self.upstream_responses, BatchedCounter, self.batch)
        self.request_duration_for = Children(self.request_duration, BatchedHistogram, self.batch)
        self.in_flight_for = Children(self.in_flight, BatchedGauge, self.batch)
        self.units_charged_for = Children(self.units_charged, BatchedCounter, self.batch)
        self.shadow_refusals_for = Children(self.shadow_refusals, BatchedCounter, self.batch)

    def flush(self) -> None:
        """Fold the hot path's pending updates into prometheus_client now."""
        self.batch.flush()

    def exposition(self) -> bytes:
        self.flush()  # this process's updates of the current iteration too
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
