"""How long a ban lasts, in the units the ban scripts use: the reference both ban stores follow
(admission/bans.py re-exports it for the pure ban logic; the store must not import admission)."""

from __future__ import annotations

import math

from gateway.config.model import Bans

StrikeCounts = tuple[int, int, int]  # strikes by kind: 401s, early rate 429s, early concurrency 429s


def ms(seconds: float) -> float:
    """A duration as the store scripts get it: milliseconds, to the microsecond."""
    return round(seconds * 1000.0, 3)


def ban_ms(policy: Bans, ban_number: int) -> int:
    """How long the `ban_number`-th remembered ban lasts (1 for the first), in whole ms
    (ceiling): min(duration * factor**(n-1), max_duration), computed in ms as the scripts do."""
    cap = ms(policy.max_duration)
    try:
        length = ms(policy.duration) * policy.factor ** max(0, ban_number - 1)
    except OverflowError:  # far past the cap
        length = cap
    return math.ceil(min(length, cap))
