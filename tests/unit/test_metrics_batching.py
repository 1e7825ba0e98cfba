"""The hot path's metric updates (gateway/metrics.py `Batch`) add to plain numbers and fold into
prometheus_client once per event-loop iteration: nothing lost, nothing counted twice, the same
exposition as direct prometheus_client calls (single-process and PROMETHEUS_MULTIPROC_DIR mode),
and at once when no event loop runs."""

from __future__ import annotations

import asyncio
import math
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram

from gateway.metrics import Metrics, observe_all

ROOT = Path(__file__).resolve().parents[2]

# One update each, as (kind, *arguments); `workload()` makes iterations of them.
Op = tuple[Any, ...]

PLANS = ("free", "pro")
ROUTES = ("/v1/**", "/v2/{id}")
# Exactly on a bucket bound (observe() counts it in that bucket), past the last bound (+Inf), 0, negative.
EDGE_AMOUNTS = (0.001, 0.005, 0.0001, 0.00025, 300.0, 1e6, 0.0, -0.5)


def workload(seed: int = 7, iterations: int = 6, per_iteration: int = 40) -> list[list[Op]]:
    """Request-like updates over several iterations: random amounts (whose float sum depends on the
    order of the additions), bucket edges, a NaN on its own route, in-flight requests that end
    in a later iteration and some that never end."""
    rng = random.Random(seed)
    iterations_ops: list[list[Op]] = []
    in_flight: list[str] = []
    for i in range(iterations):
        ops: list[Op] = []
        for n in range(per_iteration):
            plan, route = rng.choice(PLANS), rng.choice(ROUTES)
            amount = EDGE_AMOUNTS[n] if n < len(EDGE_AMOUNTS) and i == 1 else 10 ** rng.uniform(-4.5, 1.5)
            ops.append(("admission", amount / 7))
            ops.append(("request", plan, route, rng.choice(("admitted", "rate_limited"))))
            ops.append(("upstream", route, rng.choice(("2xx", "5xx", "timeout"))))
            ops.append(("duration", route, amount))
            ops.append(("in", plan))
            in_flight.append(plan)
            if rng.random() < 0.6:  # ends in this iteration: the in-flight change nets to 0
                ops.append(("out", in_flight.pop()))
            if rng.random() < 0.3:
                ops.append(("refusal",))
        while len(in_flight) > 2 and rng.random() < 0.7:  # ends in a later iteration
            ops.append(("out", in_flight.pop(0)))
        iterations_ops.append(ops)
    iterations_ops[-1].append(("duration", "/nan", math.nan))
    return iterations_ops


def apply_batched(metrics: Metrics, op: Op) -> None:
    """The hot path's calls (gateway/app.py, gateway/admission/controller.py)."""
    kind, *args = op
    if kind == "request":
        metrics.requests_for(*args).inc()
    elif kind == "upstream":
        metrics.upstream_responses_for(*args).inc()
    elif kind == "duration":
        metrics.request_duration_for(args[0]).observe(args[1])
    elif kind == "admission":
        metrics.admission_duration.observe(args[0])
    elif kind == "in":
        metrics.in_flight_for(args[0]).inc()
    elif kind == "out":
        metrics.in_flight_for(args[0]).dec()
    else:
        metrics.cached_refusals.inc()


def apply_direct(metrics: Metrics, op: Op) -> None:
    """The same updates straight on prometheus_client."""
    kind, *args = op
    if kind == "request":
        metrics.requests.labels(*args).inc()
    elif kind == "upstream":
        metrics.upstream_responses.labels(*args).inc()
    elif kind == "duration":
        metrics.request_duration.labels(args[0]).observe(args[1])
    elif kind == "admission":
        metrics.admission_duration.metric.observe(args[0])
    elif kind == "in":
        metrics.in_flight.labels(args[0]).inc()
    elif kind == "out":
        metrics.in_flight.labels(args[0]).dec()
    else:
        metrics.cached_refusals.metric.inc()


def without_created(exposition: bytes) -> list[str]:
    """The exposition's lines but the `_created` timestamps, which differ between two registries."""
    return [line for line in exposition.decode().splitlines() if "_created" not in line]


def batched_exposition() -> bytes:
    """The workload through the batched metrics, one event-loop iteration per workload iteration."""
    metrics = Metrics()

    async def run() -> None:
        for ops in workload():
            for op in ops:
                apply_batched(metrics, op)
            await asyncio.sleep(0)  # the iteration ends: its fold runs

    asyncio.run(run())
    return metrics.exposition()


def direct_exposition() -> bytes:
    metrics = Metrics()
    for ops in workload():
        for op in ops:
            apply_direct(metrics, op)
    return metrics.exposition()


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_the_folded_exposition_equals_direct_prometheus_client_calls() -> None:
    """Also the guard on the prometheus_client internals `observe_all` uses: buckets, `_count`
    and `_sum` (to the last bit: the amounts are summed in order) must match real observe()."""
    batched, direct = without_created(batched_exposition()), without_created(direct_exposition())
    assert 'gateway_in_flight_requests{plan="pro"}' in "\n".join(direct)  # the workload reached every family
    assert 'gateway_request_duration_seconds_sum{route="/nan"} NaN' in direct  # and in no bucket
    assert batched == direct


def run_in_multiprocess_mode(tmp_path: Path, mode: str) -> bytes:
    """`batched_exposition()` or `direct_exposition()` in a fresh interpreter that has
    PROMETHEUS_MULTIPROC_DIR set before prometheus_client is imported."""
    directory = tmp_path / mode
    directory.mkdir()
    script = ("import sys\nfrom tests.unit.test_metrics_batching import batched_exposition, direct_exposition\n"
              f"sys.stdout.buffer.write({mode}_exposition())\n")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    assert list(directory.iterdir())  # the values went through the multiprocess files
    return done.stdout


def test_in_multiprocess_mode_the_folded_exposition_equals_direct_calls(tmp_path: Path) -> None:
    batched = run_in_multiprocess_mode(tmp_path, "batched")
    direct = run_in_multiprocess_mode(tmp_path, "direct")
    assert b'gateway_in_flight_requests{plan="pro"}' in direct
    # the same samples; the multiprocess collector's order of families follows its files
    assert sorted(batched.decode().splitlines()) == sorted(direct.decode().splitlines())


def test_updates_in_a_loop_reach_prometheus_client_when_the_iteration_ends() -> None:
    metrics = Metrics()
    seen: list[float | None] = []

    async def run() -> None:
        for _ in range(3):
            metrics.requests_for("pro", "/v1/**", "admitted").inc()
        metrics.request_duration_for("/v1/**").observe(0.02)
        seen.append(sample(metrics, "gateway_requests_total", plan="pro", route="/v1/**", outcome="admitted"))
        seen.append(sample(metrics, "gateway_request_duration_seconds_count", route="/v1/**"))
        await asyncio.sleep(0)
        seen.append(sample(metrics, "gateway_requests_total", plan="pro", route="/v1/**", outcome="admitted"))
        seen.append(sample(metrics, "gateway_request_duration_seconds_count", route="/v1/**"))

    asyncio.run(run())
    assert seen == [0.0, 0.0, 3.0, 1.0]  # pending during the iteration, folded once it ended


def test_one_fold_is_scheduled_per_iteration() -> None:
    metrics = Metrics()
    folds_scheduled = 0

    async def run() -> None:
        nonlocal folds_scheduled
        loop = asyncio.get_running_loop()
        call_soon = loop.call_soon

        def counting_call_soon(callback: Any, *args: Any, **kwargs: Any) -> Any:
            nonlocal folds_scheduled
            folds_scheduled += callback == metrics.batch.flush
            return call_soon(callback, *args, **kwargs)

        loop.call_soon = counting_call_soon  # type: ignore[method-assign,assignment]
        try:
            for _ in range(2):
                for op in workload(iterations=1)[0]:
                    apply_batched(metrics, op)
                await asyncio.sleep(0)
        finally:
            del loop.call_soon  # type: ignore[method-assign]

    asyncio.run(run())
    assert folds_scheduled == 2


def test_exposition_folds_the_current_iterations_updates() -> None:
    metrics = Metrics()

    async def run() -> bytes:
        metrics.cached_refusals.inc()
        metrics.admission_duration.observe(0.0003)
        return metrics.exposition()

    text = asyncio.run(run()).decode().splitlines()
    assert "gateway_cached_refusals_total 1.0" in text
    assert 'gateway_admission_duration_seconds_bucket{le="0.0005"} 1.0' in text
    assert sample(metrics, "gateway_cached_refusals_total") == 1.0  # and folded once: not again later


def test_flush_folds_what_is_pending_and_is_harmless_when_nothing_is() -> None:
    metrics = Metrics()
    seen: list[float | None] = []

    async def run() -> None:
        metrics.flush()
        metrics.upstream_responses_for("/v1/**", "2xx").inc()
        metrics.flush()
        seen.append(sample(metrics, "gateway_upstream_responses_total", route="/v1/**", code="2xx"))
        metrics.upstream_responses_for("/v1/**", "2xx").inc()  # after a flush: scheduled afresh
        await asyncio.sleep(0)
        seen.append(sample(metrics, "gateway_upstream_responses_total", route="/v1/**", code="2xx"))

    asyncio.run(run())
    assert seen == [1.0, 2.0]


def test_without_a_running_loop_updates_apply_at_once() -> None:
    metrics = Metrics()
    metrics.requests_for("free", "-", "unauthorized").inc()
    metrics.request_duration_for("/v1/**").observe(0.3)
    metrics.admission_duration.observe(0.002)
    metrics.cached_refusals.inc()
    metrics.in_flight_for("free").inc()
    assert sample(metrics, "gateway_requests_total", plan="free", route="-", outcome="unauthorized") == 1.0
    assert sample(metrics, "gateway_request_duration_seconds_bucket", route="/v1/**", le="0.5") == 1.0
    assert sample(metrics, "gateway_request_duration_seconds_sum", route="/v1/**") == 0.3
    assert sample(metrics, "gateway_admission_duration_seconds_bucket", le="0.0025") == 1.0
    assert sample(metrics, "gateway_cached_refusals_total") == 1.0
    assert sample(metrics, "gateway_in_flight_requests", plan="free") == 1.0


def test_the_in_flight_gauge_is_right_after_every_fold() -> None:
    metrics = Metrics()
    seen: list[float | None] = []

    async def run() -> None:
        gauge = metrics.in_flight_for("pro")
        for changes in ("+-", "++-", "+", "-+-", "--"):
            for change in changes:
                gauge.inc() if change == "+" else gauge.dec()
            await asyncio.sleep(0)
            seen.append(sample(metrics, "gateway_in_flight_requests", plan="pro"))

    asyncio.run(run())
    assert seen == [0.0, 1.0, 2.0, 1.0, -1.0]


def test_direct_and_batched_updates_of_one_series_add_up() -> None:
    metrics = Metrics()

    async def run() -> None:
        metrics.request_duration_for("/v1/**").observe(0.25)
        metrics.request_duration.labels("/v1/**").observe(0.5)  # before the fold, straight on the child
        await asyncio.sleep(0)

    asyncio.run(run())
    assert sample(metrics, "gateway_request_duration_seconds_count", route="/v1/**") == 2.0
    assert sample(metrics, "gateway_request_duration_seconds_sum", route="/v1/**") == 0.75



@given(st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.001, 0.1, 300.0, 0.0])),
                min_size=1, max_size=12))
def test_observe_all_leaves_a_histogram_as_observe_would(amounts: list[float]) -> None:
    """NaNs mixed with numbers in one fold, amounts on a bound, past the last bound."""
    folded = Histogram("h", "h", buckets=(0.001, 0.1, 1, 300), registry=CollectorRegistry())
    direct = Histogram("h", "h", buckets=(0.001, 0.1, 1, 300), registry=CollectorRegistry())
    observe_all(folded, list(amounts))
    for amount in amounts:
        direct.observe(amount)
    assert [bucket.get() for bucket in folded._buckets] == [bucket.get() for bucket in direct._buckets]
    total, expected = folded._sum.get(), direct._sum.get()
    assert total == expected or (math.isnan(total) and math.isnan(expected))
