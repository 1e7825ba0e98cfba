"""Waiting for a free concurrency slot (SPEC §3 `wait`), without holding an upstream connection.

A plan with `wait` is admitted through the store's waiter queues (one store call, as without
`wait`). Refused for concurrency alone, the request is queued in the store, first come first
served per key across replicas, and then:

- sleeps until a wake-up (a slot of its buckets was released, a job ended or a waiter left,
  on any replica), or `recheck_interval` at most (a lease or job that expired frees a slot
  without any message), or its client disconnects;
- re-checks (one store call, which also refreshes its queue entry);
- gives up when `wait` has run out: it leaves the queue and gets the 429 it would have got.

A client that disconnects leaves the queue at once. While waiting, `receive()` is watched
for the disconnect; request body messages read meanwhile are kept (up to `BODY_LIMIT`
bytes; past that the watch pauses, and a disconnect is seen when the wait ends) and replayed
to the forwarder, in order. The bound is the server's own read buffer: with 1 MiB, 200 clients
waiting with 2 MB uploads held 360 MB.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any, cast

from gateway.admission.buckets import AdmissionPlan
from gateway.admission.controller import Admission, Ticket, recheck_interval
from gateway.asgi import Message, Receive
from gateway.store.base import ONE, Charge, WaitingStore

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


async def admit(
    admission: Admission, plan: AdmissionPlan, receive: Receive, charge: Charge = ONE
) -> tuple[Ticket, Receive]:
    """Admission of a request weighing `charge`, waiting for a slot up to the plan's `wait`.
    Returns the ticket (admitted, or the last refusal) and the `receive` the rest of the
    request must use."""
    ticket = await admission.admit(plan, charge)
    if ticket.waiting_in is None:
        return ticket, receive
    watched = WatchedReceive(receive)
    return await _wait(admission, plan, ticket, watched), watched


async def _wait(admission: Admission, plan: AdmissionPlan, ticket: Ticket, watched: WatchedReceive) -> Ticket:
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
                ticket = await admission.recheck(plan, ticket)
                if ticket.waiting_in is not None and ticket.waiting_in is not store:
                    # The store failed and the local fallback queued it: wait there instead.
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
