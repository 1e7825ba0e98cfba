from __future__ import annotations

from tests.support.invariants import max_in_window


def test_max_in_window_counts_the_densest_interval() -> None:
    assert max_in_window([], 1.0) == 0
    assert max_in_window([0.0, 0.5, 0.99, 1.0, 1.5], 1.0) == 3  # [0.5, 1.5) holds 0.5, 0.99, 1.0
    assert max_in_window([0.0, 1.0, 2.0], 1.0) == 1
    assert max_in_window([3.0, 0.0, 0.1], 1.0) == 2  # order does not matter
