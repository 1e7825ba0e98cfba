"""The sliding-window counter of `exact: false` rate limits: O(1) state per bucket. Pure.

admit.lua mirrors this module operation for operation (same float operations in the same
order), so the memory store and the Redis store take the same decisions at the same instants.

State: the index of the current fixed window (`floor(now / window)`), the admissions counted
in it and those counted in the window before. At time `now`, with `f` the fraction of the
current fixed window elapsed, the estimate of the admissions in the sliding window ending now
is `previous * (1 - f) + count`. A request is admitted when `estimate + 1 <= limit`, so the
estimate never exceeds the limit. Without admissions the estimate only falls, continuously
(at a window boundary the count becomes the previous count, with its full weight).

To keep decisions exact in floats for whole-ms times, comparisons use the estimate scaled by
the window length: `scaled = previous * (window - elapsed) + count * window`.

Error bound (docs/configuration.md): every aligned fixed window admits at most `limit`, and
any sliding window of length `window` at most `limit + previous * f < 2 * limit`, reached
only when the previous window's admissions bunch at its very end. The counter can also
refuse where an exact log would admit (the previous window's admissions bunched at its start).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CounterState:
    """One bucket's stored state. `window_ms` is the length `window` was computed with: after
    a reload that changes it, the old state is carried over (see `seen_at`)."""

    window: int  # index of the fixed window `count` belongs to: floor(time_ms / window_ms)
    count: int  # admitted in that fixed window
    previous: int  # admitted in the fixed window before it
    window_ms: int


def window_index(now: float, window_ms: int) -> int:
    return math.floor(now / window_ms)


def empty(now: float, window_ms: int) -> CounterState:
    return CounterState(window_index(now, window_ms), 0, 0, window_ms)


def seen_at(state: CounterState | None, now: float, window_ms: int) -> CounterState:
    """The state as it stands at `now` (rolled over to now's fixed window). Pure: the caller
    stores it only when it admits."""
    index = window_index(now, window_ms)
    if state is None:
        return CounterState(index, 0, 0, window_ms)
    if state.window_ms != window_ms or state.window > index:
        # A reload changed the window, or the state is from the future (the clock went back):
        # keep what it counts now, as admissions of the current fixed window (never fewer).
        return CounterState(index, _carried(state, now), 0, window_ms)
    if state.window == index:
        return state
    if state.window == index - 1:
        return CounterState(index, 0, state.count, window_ms)
    return CounterState(index, 0, 0, window_ms)


def _carried(state: CounterState, now: float) -> int:
    own = window_index(now, state.window_ms)
    if state.window > own:
        return state.count + state.previous
    return whole_count(seen_at(state, now, state.window_ms), now)


def scaled_estimate(view: CounterState, now: float) -> float:
    """The estimate times the window length, for a view already `seen_at(now)`."""
    window = float(view.window_ms)
    elapsed = now - view.window * window
    return float(view.previous) * (window - elapsed) + float(view.count) * window


def fits(view: CounterState, now: float, target: int) -> bool:
    """True when the estimate at `now` is at most `target` (the view rolls over as needed)."""
    rolled = seen_at(view, now, view.window_ms)
    return scaled_estimate(rolled, now) <= target * float(view.window_ms)


def admits(view: CounterState, now: float, limit: int, units: int = 1) -> bool:
    """Room for `units` more: estimate + units <= limit."""
    return fits(view, now, limit - units)


def whole_count(view: CounterState, now: float) -> int:
    """The estimate rounded up: the smallest k with estimate <= k, decided by the same float
    comparison as `admits` (so admitted implies k <= limit - 1 and refused k >= limit)."""
    scaled = scaled_estimate(view, now)
    window = float(view.window_ms)
    k = math.ceil(scaled / window)
    if scaled > k * window:
        k += 1
    elif k > 0 and scaled <= (k - 1) * window:
        k -= 1
    return max(0, k)


def after_admission(view: CounterState, units: int = 1) -> CounterState:
    return CounterState(view.window, view.count + units, view.previous, view.window_ms)


def wait_ms(view: CounterState, now: float, target: int) -> int:
    """Whole ms (ceiling, never early) from `now` until the estimate is at most `target` >= 0,
    with no other admission. The window rollover is counted: the count becomes the previous."""
    window = float(view.window_ms)
    if fits(view, now, target):
        return 0
    elapsed = now - view.window * window
    if view.count <= target:
        # Reached inside this fixed window, as the previous window's weight falls
        # (previous > 0 here, or it would already fit).
        reached = window - (target - view.count) * window / view.previous
        wait = reached - elapsed
    else:
        # Reached in the next fixed window, as this window's count (then the previous) falls.
        wait = (window - elapsed) + (window - target * window / view.count)
    ms = max(1, math.ceil(wait))
    while not fits(view, now + ms, target):  # float rounding: never answer early
        ms += 1
    return ms


def retry_after_ms(view: CounterState, now: float, limit: int, units: int = 1) -> int:
    """For a refused request: ms until the bucket admits `units` (the window when it never can)."""
    if limit - units < 0:
        return view.window_ms
    return wait_ms(view, now, limit - units)


def reset_ms(view: CounterState, now: float) -> int:
    """Ms until one more request fits than fits now: until the rounded-up estimate drops by
    one. `view` counts this request when it was admitted."""
    return wait_ms(view, now, max(0, whole_count(view, now) - 1))
