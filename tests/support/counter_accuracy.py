"""How far the `exact: false` sliding-window counter (gateway/store/window_counter.py) strays
from the exact sliding log, on simulated traffic. Pure and deterministic (seeded).

Both limiters see the same arrivals and decide independently. Reported per traffic pattern:
the fraction of decisions that differ (and which way), and the largest number the counter
admitted in any sliding window, as a multiple of the limit (the exact log's is at most 1).

Run: `.venv/bin/python -m tests.support.counter_accuracy` (the table in docs/configuration.md).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from gateway.store import window_counter
from gateway.store.window_counter import CounterState

# (random, limit, window_ms, windows) -> sorted arrival offsets in ms, within windows * window_ms
Arrivals = Callable[[random.Random, int, int, int], list[float]]
# Stores see large clock values (epoch ms in Redis): keep the float behaviour alike.
START_MS = 1_700_000_000_000.0


class ExactLog:
    """The reference: admit when fewer than `limit` admissions lie in (now - window, now]."""

    def __init__(self, limit: int, window_ms: int) -> None:
        self.limit, self.window_ms = limit, window_ms
        self.times: deque[float] = deque()

    def admit(self, now: float) -> bool:
        while self.times and self.times[0] <= now - self.window_ms:
            self.times.popleft()
        if len(self.times) >= self.limit:
            return False
        self.times.append(now)
        return True


class Counter:
    """The counter as both stores run it: a refused request writes nothing."""

    def __init__(self, limit: int, window_ms: int) -> None:
        self.limit, self.window_ms = limit, window_ms
        self.state: CounterState | None = None

    def admit(self, now: float) -> bool:
        view = window_counter.seen_at(self.state, now, self.window_ms)
        if not window_counter.admits(view, now, self.limit):
            return False
        self.state = window_counter.after_admission(view)
        return True


def most_in_any_window(admitted: Iterable[float], window_ms: int) -> int:
    """The most admissions inside any (t - window, t] (the max is reached at an admission)."""
    inside: deque[float] = deque()
    most = 0
    for t in admitted:
        inside.append(t)
        while inside[0] <= t - window_ms:
            inside.popleft()
        most = max(most, len(inside))
    return most


@dataclass(frozen=True, slots=True)
class Accuracy:
    pattern: str
    requests: int
    differ: float  # fraction of decisions where the two disagree
    over: float  # fraction where the counter admits and the log refuses
    under: float  # fraction where the counter refuses and the log admits
    max_window_ratio: float  # most counter admissions in one sliding window / limit
    admitted_ratio: float  # counter admissions / log admissions


def compare(pattern: str, arrivals: list[float], limit: int, window_ms: int) -> Accuracy:
    log, counter = ExactLog(limit, window_ms), Counter(limit, window_ms)
    over = under = by_log = 0
    admitted: list[float] = []
    for now in arrivals:
        exact, approximate = log.admit(now), counter.admit(now)
        over += approximate and not exact
        under += exact and not approximate
        by_log += exact
        if approximate:
            admitted.append(now)
    n = max(1, len(arrivals))
    return Accuracy(
        pattern=pattern,
        requests=len(arrivals),
        differ=(over + under) / n,
        over=over / n,
        under=under / n,
        max_window_ratio=most_in_any_window(admitted, window_ms) / limit,
        admitted_ratio=len(admitted) / max(1, by_log),
    )


def poisson(load: float) -> Arrivals:
    """Poisson arrivals at `load` times the limit's rate."""

    def arrivals(rnd: random.Random, limit: int, window_ms: int, windows: int) -> list[float]:
        rate = load * limit / window_ms  # per ms
        times: list[float] = []
        t = 0.0
        while True:
            t += rnd.expovariate(rate)
            if t >= windows * window_ms:
                return times
            times.append(t)

    return arrivals


def bursty(rnd: random.Random, limit: int, window_ms: int, windows: int) -> list[float]:
    """Background Poisson at 0.2x the limit; in 30 % of the windows a burst of 1.5x the limit
    within a tenth of a window, at a random place."""
    times = poisson(0.2)(rnd, limit, window_ms, windows)
    for w in range(windows):
        if rnd.random() < 0.3:
            at = (w + rnd.random() * 0.9) * window_ms
            times += [at + rnd.random() * window_ms / 10 for _ in range(limit * 3 // 2)]
    return sorted(times)


PATTERNS: dict[str, Arrivals] = {
    "Poisson 0.5x": poisson(0.5),
    "Poisson 1x": poisson(1.0),
    "Poisson 2x": poisson(2.0),
    "bursty": bursty,
}


def measure(limit: int = 100, window_ms: int = 1000, windows: int = 200, seed: int = 7) -> list[Accuracy]:
    rows = []
    for name, pattern in PATTERNS.items():
        offsets = pattern(random.Random(f"{seed}:{name}"), limit, window_ms, windows)
        arrivals = [round(START_MS + offset, 3) for offset in offsets]  # the stores' now: ms, 3 decimals
        rows.append(compare(name, arrivals, limit, window_ms))
    return rows


def main() -> None:
    print(
        "| traffic | limit | requests | decisions differing | counter admits, log refuses | counter refuses,"
        " log admits | most in one sliding window | admitted vs log |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for limit in (10, 100, 1000):
        for row in measure(limit=limit):
            print(
                f"| {row.pattern} | {limit} | {row.requests:,} | {row.differ:.2%} | {row.over:.2%} |"
                f" {row.under:.2%} | {row.max_window_ratio:.2f} × N | {row.admitted_ratio:.3f} |"
            )


if __name__ == "__main__":
    main()
