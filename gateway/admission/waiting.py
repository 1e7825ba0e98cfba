"""Waiting for a free concurrency slot (SPEC §3 `wait`), without holding an upstream connection.

A plan with `wait` is admitted through the store's waiter queues (one store call, as without
`wait`). Refused for concurrency alone, the request is queued in the store, first come first
served per key across replicas, and then:

- sleeps until a wake-up (a slot of its buckets was released, a job ended or a waiter left,
  on any replica), or `recheck_interval` at most (a lease or job that expired frees a slot
  without any message), or its client disconnects;
- re-checks (one store call, which also refreshes its queue entry);
- gives up when `wait` has run out: it leaves the queue and gets the 429 it would have got.

A config reload while it waits changes what it waits for: at its next check it asks `replan`
for its plan under the config now in force, leaves the old plan's queues and is checked under
the new plan with its first arrival, so a raised limit admits it at once, ahead of newcomers,
and a lowered one holds it to the new number. A key or route the reload removed ends the wait
(`replan` answers None).

A client that disconnects leaves the queue at once. While waiting, `receive()` is watched
for the disconnect; request body messages read meanwhile are kept (up to `BODY_LIMIT`
bytes; past that the watch pauses, and a disconnect is seen when the wait ends) and replayed
to the forwarder, in order. The bound is the server's own read buffer: with 1 MiB, 200 clients
waiting with 2 MB uploads held 360 MB.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Any, cast

from gateway.admission.buckets import AdmissionPlan
from gateway.admission.controller import Admission, Ticket, recheck_interval
from gateway.asgi import Message, Receive
from gateway.store.base import WaitingStore

BODY_LIMIT = 64 * 1024  # as uvicorn's buffer, past which it stops reading the socket


class WatchedReceive:
    """`receive` with a watch for `http.disconnect`; what was read is replayed in order."""

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._buffer: collections.deque[Message] = collections.deque()
        self._buffered = 0
        self._pending: asyncio.Future[Message] | None = None
        self.disconnected = False

    async def __call__(self) -> Message:
        if self._buffer:
            return self._buffer.popleft()
        if self._pending is not None:
            pending, self._pending = self._pending, None
            return await pending
        return await self._receive()

    def _arm(self) -> asyncio.Future[Message] | None:
        if self._pending is None and not self.disconnected and self._buffered <= BODY_LIMIT:
            self._pending = asyncio.ensure_future(self._receive())
        return self._pending

    def _take(self, message: Message) -> None:
        self._buffer.append(message)
        if message["type"] == "http.disconnect":
            self.disconnected = True
        else:
            self._buffered += len(message.get("body", b""))

    async def sleep(self, event: asyncio.Event, timeout: float) -> None:
        """Return when `event` is set, the client disconnected, or after `timeout` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        woken = asyncio.ensure_future(event.wait())
        try:
            while not self.disconnected and not woken.done():
                left = deadline - loop.time()
                if left <= 0:
                    return
                pending = self._arm()
                waiting: set[asyncio.Future[Any]] = {woken} if pending is None else {woken, pending}
                await asyncio.wait(waiting, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                if pending is not None and pending.done():
                    self._pending = None
                    self._take(pending.result())
        finally:
            woken.cancel()


Replan = Callable[[], "AdmissionPlan | None"]  # the request's plan under the config in force now


def _unwatched() -> None:
    """No watch to undo (between a plan's queues and the next's)."""


async def wait(
    admission: Admission, plan: AdmissionPlan, ticket: Ticket, receive: Receive, replan: Replan | None = None
) -> tuple[Ticket, Receive]:
    """Wait with a `ticket` the first admission queued (`ticket.waiting_in`), up to the plan's
    `wait`. Returns the ticket (admitted, or the last refusal; not waiting) and the `receive`
    the rest of the request must use. With `replan`, the plan follows a reload (the module's doc)."""
    watched = WatchedReceive(receive)
    return await _wait(admission, plan, ticket, watched, replan), watched


async def _wait(
    admission: Admission, plan: AdmissionPlan, ticket: Ticket, watched: WatchedReceive, replan: Replan | None
) -> Ticket:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + plan.wait
    interval = recheck_interval(plan.wait)
    event = asyncio.Event()
    store = ticket.waiting_in
    unwatch = cast(WaitingStore, store).watch(plan.slots, event)
    try:
        try:
            while ticket.waiting_in is not None:
                left = deadline - loop.time()
                if left <= 0:
                    break
                await watched.sleep(event, min(interval, left))
                if watched.disconnected:
                    break
                event.clear()
                current = plan if replan is None else replan()
                if current is plan:
                    ticket = await admission.recheck(plan, ticket)
                else:  # a reload: out of the old plan's queues, into the new one's, in its place
                    admission.leave_queue(plan, ticket)
                    unwatch()
                    unwatch = _unwatched
                    if current is None:
                        break  # its key or route is gone
                    plan = current
                    ticket = await admission.requeue(plan, ticket, store)
                    interval = recheck_interval(plan.wait)
                    deadline = min(deadline, loop.time() + plan.wait)
                if ticket.waiting_in is not None and (ticket.waiting_in is not store or unwatch is _unwatched):
                    # The local fallback queued it (the store failed), or the plan changed: watch there.
                    unwatch()
                    store = ticket.waiting_in
                    unwatch = cast(WaitingStore, store).watch(plan.slots, event)
        finally:
            unwatch()
            admission.leave_queue(plan, ticket)
    except BaseException:
        admission.release(plan, ticket)  # admitted by a recheck, then failed or cancelled: no leak
        raise
    return ticket
