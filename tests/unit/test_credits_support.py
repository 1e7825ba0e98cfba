"""The oracles the credit e2e tests judge by: if they were wrong, those tests could not fail."""

from __future__ import annotations

import datetime as dt

from tests.support.credits import ietf_items, max_units_in_window, seconds_to_utc_midnight


def test_max_units_in_window_weighs_each_arrival() -> None:
    arrivals = [0.0, 0.5, 1.0, 1.9, 2.0, 2.05, 4.5]
    units = [25, 5, 10, 1, 25, 5, 1]
    assert max_units_in_window(arrivals, units, 2.0) == 46  # [0.5, 2.5): 5 + 10 + 1 + 25 + 5; 2.0 is not in [0, 2)
    assert max_units_in_window(arrivals, units, 2.1) == 71  # [0, 2.1): all but the last
    assert max_units_in_window(arrivals, units, 0.01) == 25
    assert max_units_in_window(list(reversed(arrivals)), list(reversed(units)), 2.0) == 46  # order-free
    assert max_units_in_window([], [], 1.0) == 0


def test_ietf_items() -> None:
    items = ietf_items('"credits";r=97;t=60, "browsers";r=4, "daily";q=30;w=86400')
    assert items == {"credits": {"r": "97", "t": "60"}, "browsers": {"r": "4"}, "daily": {"q": "30", "w": "86400"}}
    assert ietf_items(None) == {}


def test_seconds_to_utc_midnight() -> None:
    noon = dt.datetime(2026, 12, 31, 12, 0, 0, tzinfo=dt.UTC).timestamp()
    assert seconds_to_utc_midnight(noon) == 12 * 3600
    assert seconds_to_utc_midnight(noon + 12 * 3600 - 0.25) == 0.25
