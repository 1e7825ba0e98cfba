from __future__ import annotations

from gateway.admission.breaker import CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_threshold_then_lets_one_probe_through() -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold=3, cooldown=1.0, clock=clock)
    for _ in range(2):
        assert breaker.allow()
        breaker.failure()
    assert breaker.allow() and not breaker.is_open
    breaker.failure()
    assert breaker.is_open and not breaker.allow()
    clock.now += 1.01
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # only one at a time
    breaker.failure()
    assert not breaker.allow()  # reopened for another cooldown
    clock.now += 1.01
    assert breaker.allow()
    breaker.success()
    assert not breaker.is_open and breaker.allow() and breaker.allow()


def test_success_resets_the_count() -> None:
    breaker = CircuitBreaker(threshold=2, cooldown=1.0, clock=Clock())
    breaker.failure()
    breaker.success()
    breaker.failure()
    assert breaker.allow()


def test_an_abandoned_probe_lets_the_next_one_through() -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold=1, cooldown=1.0, clock=clock)
    breaker.failure()
    clock.now += 1.01
    assert breaker.allow()  # the probe; its caller is then cancelled
    breaker.abandon()
    assert breaker.allow()  # without abandon() this would be refused for ever


def test_clean_flag_agrees_with_allow_and_success() -> None:
    """`clean` is the hot path's shortcut: while it is True, `allow()` must be True and
    `success()` must change nothing (any sequence of events, any threshold)."""
    import random

    rng = random.Random(19)
    for threshold in (1, 2, 3):
        clock = Clock()
        breaker = CircuitBreaker(threshold=threshold, cooldown=1.0, clock=clock)
        for _ in range(2000):
            event = rng.choice(("allow", "success", "failure", "abandon", "tick"))
            if event == "tick":
                clock.now += rng.choice((0.3, 1.01))
            else:
                getattr(breaker, event)()
            if breaker.clean:
                state = (breaker._failures, breaker._probing, breaker._open_until)
                assert state[:2] == (0, False)
                assert breaker.allow()
                breaker.success()
                assert (breaker._failures, breaker._probing, breaker._open_until) == state
