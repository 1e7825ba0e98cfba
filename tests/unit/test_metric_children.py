"""The hot path's cached labelled children (gateway/metrics.py `Children`) update the very series
`labels()` names, also for label values first seen later (a reload's new plans and routes)."""

from __future__ import annotations

from prometheus_client import generate_latest

from gateway.metrics import Metrics


def sample(metrics: Metrics, line_start: str) -> float:
    for line in generate_latest(metrics.registry).decode().splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {line_start}")


def test_cached_children_count_into_the_labelled_series() -> None:
    metrics = Metrics()
    for _ in range(3):
        metrics.requests_for("pro", "/v1/**", "admitted").inc()
    metrics.requests.labels("pro", "/v1/**", "admitted").inc()  # the same series, either way
    metrics.requests_for("free", "/v1/**", "rate_limited").inc()  # a new tuple later on
    assert sample(metrics, 'gateway_requests_total{outcome="admitted",plan="pro",route="/v1/**"}') == 4
    assert sample(metrics, 'gateway_requests_total{outcome="rate_limited",plan="free",route="/v1/**"}') == 1
    batched = metrics.requests_for("pro", "/v1/**", "admitted")
    assert batched.metric is metrics.requests.labels("pro", "/v1/**", "admitted")


def test_every_cached_family_reaches_its_metric() -> None:
    metrics = Metrics()
    metrics.upstream_responses_for("/v1/**", "2xx").inc()
    metrics.request_duration_for("/v1/**").observe(0.02)
    gauge = metrics.in_flight_for("pro")
    gauge.inc()
    gauge.inc()
    metrics.in_flight_for("pro").dec()
    assert sample(metrics, 'gateway_upstream_responses_total{code="2xx",route="/v1/**"}') == 1
    assert sample(metrics, 'gateway_request_duration_seconds_count{route="/v1/**"}') == 1
    assert sample(metrics, 'gateway_in_flight_requests{plan="pro"}') == 1
