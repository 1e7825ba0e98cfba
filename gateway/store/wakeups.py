"""Wake-ups for requests waiting for a slot: "a slot of these buckets may have freed".

Waiters register an `asyncio.Event` per hash tag (all buckets of one key share one). Inside
one process `LocalWakeups` sets them directly. Across replicas, `RedisWakeups` keeps one
pub/sub connection per process, subscribed to the channel of every tag that has a local
waiter (and to nothing when nobody waits); a release that may wake someone publishes on the
tag's channel in the same pipeline as its ZREM, so the message can only arrive after the
slot is free. A subscription being confirmed wakes the tag's waiters too, so a slot freed
before the subscription was in place is not missed. Lost messages (a reconnect) cost only
latency: waiters also re-check on a slow timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger(__name__)

# While subscribed, the reader returns to its loop this often to (un)subscribe: the delay a
# new waiter's subscription may see. Reading a local socket: no load on Redis.
_READ_SLICE = 0.05
_RETRY_AFTER = 0.5


class LocalWakeups:
    """tag -> the events of the waiters on that tag, in this process."""

    def __init__(self, on_change: Callable[[], None] | None = None) -> None:
        self._events: dict[str, set[asyncio.Event]] = {}
        self._on_change = on_change

    def tags(self) -> set[str]:
        return set(self._events)

    def watch(self, tags: Iterable[str], event: asyncio.Event) -> Callable[[], None]:
        chosen = set(tags)
        changed = False
        for tag in chosen:
            events = self._events.setdefault(tag, set())
            changed |= not events
            events.add(event)
        if changed and self._on_change is not None:
            self._on_change()

        def unwatch() -> None:
            gone = False
            for tag in chosen:
                events = self._events.get(tag)
                if events is not None:
                    events.discard(event)
                    if not events:
                        del self._events[tag]
                        gone = True
            if gone and self._on_change is not None:
                self._on_change()

        return unwatch

    def wake(self, tag: str) -> None:
        for event in self._events.get(tag, ()):
            event.set()

    def wake_all(self) -> None:
        for events in self._events.values():
            for event in events:
                event.set()


class RedisWakeups:
    """The pub/sub side: one reader task, subscribed to the channels local waiters need."""

    def __init__(self, client: Any, channel_prefix: str) -> None:
        self._client = client
        self._prefix = channel_prefix
        self.local = LocalWakeups(on_change=self._changed)
        self._change = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._active: set[str] = set()  # tags whose subscription is confirmed

    def channel(self, tag: str) -> str:
        return f"{self._prefix}{tag}"

    def watch(self, tags: Iterable[str], event: asyncio.Event) -> Callable[[], None]:
        if self._task is None and not self._closed:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="redis-store-wakeups")
        chosen = set(tags)
        unwatch = self.local.watch(chosen, event)
        if chosen & self._active:
            event.set()  # already subscribed: nothing from now on can be missed
        return unwatch

    def _changed(self) -> None:
        self._change.set()

    async def aclose(self) -> None:
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while not self._closed:
            pubsub = self._client.pubsub()
            try:
                await self._listen(pubsub)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # connection lost, Redis down: waiters fall back on their timer
                log.warning("wake-up subscription failed, retrying: %r", exc)
                self.local.wake_all()
                await asyncio.sleep(_RETRY_AFTER)
            finally:
                self._active.clear()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def _listen(self, pubsub: Any) -> None:
        subscribed: set[str] = set()
        while True:
            wanted = {self.channel(tag) for tag in self.local.tags()}
            self._change.clear()
            if wanted - subscribed:
                await pubsub.subscribe(*(wanted - subscribed))
            if subscribed - wanted:
                await pubsub.unsubscribe(*(subscribed - wanted))
                self._active -= {channel[len(self._prefix):] for channel in subscribed - wanted}
            subscribed = wanted
            if not subscribed:
                await self._change.wait()
                continue
            message = await pubsub.get_message(timeout=_READ_SLICE)
            while message is not None:
                if message.get("type") in ("message", "subscribe"):
                    channel = message.get("channel")
                    if isinstance(channel, bytes):
                        channel = channel.decode()
                    if isinstance(channel, str) and channel.startswith(self._prefix):
                        tag = channel[len(self._prefix):]
                        if message["type"] == "subscribe":
                            self._active.add(tag)
                        self.local.wake(tag)
                message = await pubsub.get_message(timeout=0)
