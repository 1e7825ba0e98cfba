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
