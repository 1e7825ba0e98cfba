"""Fixed UTC periods of quotas, from a store clock in ms. Pure.

lua/periods.lua mirrors this module line for line (integer-valued float arithmetic, exact
below 2**53), so both stores put an instant in the same period. Days are counted from the
Unix epoch; months use the proleptic Gregorian calendar (H. Hinnant's civil-date algorithms).
"""

from __future__ import annotations

import math

DAY_MS = 86_400_000
# 1970-01-05, the first Monday after the epoch: ISO weeks start there.
_FIRST_MONDAY = 4
PERIODS = ("1d", "7d", "month")


def _civil_from_days(z: int) -> tuple[int, int]:
    """(year, month 1..12) of day `z` since 1970-01-01."""
    z += 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    year = yoe + era * 400
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    month = mp + 3 if mp < 10 else mp - 9
    return (year + 1 if month <= 2 else year), month


def _days_from_civil(year: int, month: int) -> int:
    """Day since 1970-01-01 of the first of `month` in `year`."""
    if month <= 2:
        year -= 1
    era = year // 400
    yoe = year - era * 400
    mp = month - 3 if month > 2 else month + 9
    doy = (153 * mp + 2) // 5
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def period_of(now_ms: float, period: str) -> tuple[int, int, int]:
    """(index, end_ms, length_ms) of the period holding `now_ms`: `1d` UTC days, `7d` ISO
    weeks (Monday 00:00 UTC), `month` calendar months UTC (index = year * 12 + month - 1)."""
    day = math.floor(now_ms / DAY_MS)
    if period == "1d":
        return day, (day + 1) * DAY_MS, DAY_MS
    if period == "7d":
        index = (day - _FIRST_MONDAY) // 7
        start = index * 7 + _FIRST_MONDAY
        return index, (start + 7) * DAY_MS, 7 * DAY_MS
    if period == "month":
        year, month = _civil_from_days(day)
        start = _days_from_civil(year, month)
        end = _days_from_civil(year + 1, 1) if month == 12 else _days_from_civil(year, month + 1)
        return year * 12 + month - 1, end * DAY_MS, (end - start) * DAY_MS
    raise ValueError(f"unknown quota period {period!r}")


def key_ttl_ms(now_ms: float, end_ms: int) -> int:
    """A quota key lives to its period's end plus a day."""
    return math.ceil(end_ms - now_ms + DAY_MS)
