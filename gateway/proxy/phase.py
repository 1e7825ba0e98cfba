"""`asyncio.timeout`'s cancel scope, cut down for the forwarder's hot path.

Every forwarded request runs two or three phases (the first body message, the wait for the
response headers, the response stream), and `asyncio.timeout` costs several microseconds each
on Python 3.11: a task lookup, an enum state machine and an `async with`. The forwarder knows
its task up front and needs only what is here: a deadline (or none), `stop_now()` to end the
phase early, and at exit the same rule as asyncio's: the cancellation this phase caused, and no
other, becomes a `TimeoutError` (a cancellation of the task from outside still propagates).
"""

from __future__ import annotations

import asyncio
from types import TracebackType


class Phase:
    """`with Phase(task, delay):` like `async with asyncio.timeout(delay):`, for `task`, the
    task running the block."""

    __slots__ = ("_task", "_handle", "_expiring", "_cancelling")

    def __init__(self, task: asyncio.Task[object], delay: float | None) -> None:
        self._task = task
        self._expiring = False
        self._cancelling = task.cancelling()  # cancellations already pending are not ours
        self._handle: asyncio.Handle | None = None
        if delay is not None:
            loop = task.get_loop()
            self._handle = loop.call_at(loop.time() + delay, self._expire)

    def __enter__(self) -> Phase:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        # Ours when no other cancellation was requested meanwhile (asyncio.Timeout's rule).
        if self._expiring and self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
            raise TimeoutError from exc

    def stop_now(self) -> bool:
        """End the phase as if its deadline had passed: the task is cancelled on the next loop
        turn. False when it is already ending."""
        if self._expiring:
            return False
        if self._handle is not None:
            self._handle.cancel()
        self._handle = self._task.get_loop().call_soon(self._expire)
        return True

    def _expire(self) -> None:
        self._handle = None
        self._expiring = True
        self._task.cancel()
