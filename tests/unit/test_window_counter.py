"""The sliding-window counter of `exact: false` rate limits (gateway/store/window_counter.py):
its error bound against the exact sliding log, the numbers the headers are built from, and
that Retry-After is never early. Pure and fast (driven clocks, Hypothesis)."""

from __future__ import annotations

from collections import Counter as Tally
from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st

from gateway.store import window_counter as wc
from gateway.store.window_counter import CounterState
from tests.support.counter_accuracy import START_MS, measure, most_in_any_window

WINDOWS_MS = (1, 7, 100, 1000, 60_000)


@st.composite
def traffic(draw: st.DrawFn) -> tuple[int, int, list[float]]:
    """(limit, window_ms, arrival times): whole-ms or sub-ms gaps, bunched and spread."""
    limit = draw(st.integers(1, 12))
    window = draw(st.sampled_from(WINDOWS_MS))
    if draw(st.booleans()):
        spread = st.integers(0, 3 * window).map(float)
    else:
        spread = st.floats(0, 3 * window).map(lambda gap: round(gap, 3))
    gaps = draw(st.lists(st.one_of(st.just(0.0), spread), min_size=1, max_size=120))
    t = START_MS + draw(st.integers(0, window - 1))
    times = []
    for gap in gaps:
        t = round(t + gap, 3)  # the stores' now: ms with 3 decimals
        times.append(t)
    return limit, window, times


@dataclass(frozen=True, slots=True)
class Decision:
    now: float
    view: CounterState  # the state seen at `now`, before this request
    admitted: bool


def run(limit: int, window: int, times: list[float]) -> list[Decision]:
    """What a store does per request: look, decide, write only when admitted."""
    state: CounterState | None = None
    decisions = []
    for now in times:
        view = wc.seen_at(state, now, window)
        admitted = wc.admits(view, now, limit)
        if admitted:
            state = wc.after_admission(view)
        decisions.append(Decision(now, view, admitted))
    return decisions


@given(traffic())
def test_each_fixed_window_admits_at_most_the_limit(case: tuple[int, int, list[float]]) -> None:
    limit, window, times = case
    per_window = Tally(wc.window_index(d.now, window) for d in run(limit, window, times) if d.admitted)
    assert max(per_window.values(), default=0) <= limit


@given(traffic())
def test_a_sliding_window_holds_at_most_limit_plus_the_previous_windows_weighted_share(
    case: tuple[int, int, list[float]],
) -> None:
    """The documented bound: in (t - window, t] at most limit + previous * f < 2 * limit,
    checked at every admission against an exact log of what was admitted."""
    limit, window, times = case
    admitted = [d for d in run(limit, window, times) if d.admitted]
    per_window = Tally(wc.window_index(d.now, window) for d in admitted)
    for position, decision in enumerate(admitted):
        inside = sum(1 for d in admitted[: position + 1] if d.now > decision.now - window)
        index = wc.window_index(decision.now, window)
        elapsed = (decision.now - index * window) / window
        assert inside <= limit + per_window[index - 1] * elapsed + 1e-9
        assert inside < 2 * limit


@given(traffic())
def test_counts_match_the_decision_so_remaining_headers_stay_consistent(case: tuple[int, int, list[float]]) -> None:
    limit, window, times = case
    for d in run(limit, window, times):
        count = wc.whole_count(d.view, d.now)
        if d.admitted:
            assert count <= limit - 1  # Remaining = limit - count - 1 >= 0
        else:
            assert count >= limit  # Remaining 0


@given(traffic(), st.integers(0, 5))
def test_retry_after_is_never_early_and_holds_once_reached(case: tuple[int, int, list[float]], later: int) -> None:
    """A refused request retried after `retry_after_ms` (and any time after) is admitted when
    nothing else was; with whole-ms clocks one ms earlier it is still refused (tight)."""
    limit, window, times = case
    for d in run(limit, window, times):
        if d.admitted:
            continue
        retry = wc.retry_after_ms(d.view, d.now, limit)
        assert retry >= 1
        assert wc.admits(d.view, d.now + retry, limit)
        assert wc.admits(d.view, d.now + retry + later * window // 3, limit)
        assert not wc.admits(d.view, d.now + retry - 1, limit) or d.now != int(d.now)


@given(traffic())
def test_reset_is_when_the_rounded_up_estimate_drops_by_one(case: tuple[int, int, list[float]]) -> None:
    limit, window, times = case
    for d in run(limit, window, times):
        after = wc.after_admission(d.view) if d.admitted else d.view
        count = wc.whole_count(after, d.now)
        reset = wc.reset_ms(after, d.now)
        if count == 0:
            assert reset == 0
            continue
        assert 1 <= reset <= 2 * window
        later = wc.seen_at(after, d.now + reset, window)
        assert wc.whole_count(later, d.now + reset) <= count - 1


def test_retry_after_counts_the_window_rollover() -> None:
    """3 per 1000 ms, all at the start of a fixed window: the counter refuses until a third
    of the next window has passed (the exact log would say 700 ms)."""
    t0 = 1_000_000_000.0  # a window boundary
    view = CounterState(wc.window_index(t0, 1000), 3, 0, 1000)
    assert wc.whole_count(view, t0 + 300) == 3
    assert wc.retry_after_ms(view, t0 + 300, 3) == 1034  # 700 + 333.3, rounded up
    assert not wc.admits(view, t0 + 1333, 3)
    assert wc.admits(view, t0 + 1334, 3)


def test_the_bound_is_reached_when_the_previous_window_bunches_at_its_end() -> None:
    """The adversarial case: `limit` admissions in the last ms of a fixed window, then as many
    as the counter allows: one sliding window holds 2 * limit - 1."""
    limit, window = 10, 1000
    t0 = 1_000_000_000.0
    times = [t0 + 999.0] * limit + [t0 + 1000.0 + ms for ms in range(999)]
    admitted = [d.now for d in run(limit, window, times) if d.admitted]
    assert most_in_any_window(admitted, window) == 2 * limit - 1


def test_a_reloaded_window_carries_what_the_bucket_counts() -> None:
    t0 = 1_000_000_000.0
    old = CounterState(wc.window_index(t0, 1000), 4, 6, 1000)
    now = t0 + 500  # estimate 6 * 0.5 + 4 = 7
    longer = wc.seen_at(old, now, 60_000)
    assert (longer.window, longer.count, longer.previous, longer.window_ms) == (
        wc.window_index(now, 60_000),
        7,
        0,
        60_000,
    )
    # A state from the future (the clock went back) counts everything it holds.
    ahead = wc.seen_at(old, t0 - 5000, 1000)
    assert (ahead.count, ahead.previous) == (10, 0)


def test_old_state_ages_out_after_two_windows() -> None:
    t0 = 1_000_000_000.0
    state = CounterState(wc.window_index(t0, 1000), 5, 5, 1000)
    next_window = wc.seen_at(state, t0 + 1000, 1000)
    assert (next_window.count, next_window.previous) == (0, 5)
    gone = wc.seen_at(state, t0 + 2000, 1000)
    assert (gone.count, gone.previous) == (0, 0)


def test_measured_error_on_realistic_traffic_stays_within_the_documented_figures() -> None:
    """The figures docs/configuration.md quotes (tests/support/counter_accuracy.py), on a
    smaller seeded run: never 2x the limit in a sliding window, totals close to the log's."""
    rows = {row.pattern: row for row in measure(limit=100, windows=60)}
    assert all(row.max_window_ratio < 2 for row in rows.values())
    assert rows["Poisson 0.5x"].differ < 0.01
    assert rows["Poisson 1x"].differ < 0.15
    assert all(0.9 <= row.admitted_ratio <= 1.1 for row in rows.values())
    assert rows["bursty"].max_window_ratio > 1  # bursts do get past the limit: the bound is real
