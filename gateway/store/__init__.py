"""Admission stores: `open_store` picks one from the configured URL.

`memory://` gives the in-process store (one process); `redis://`, `rediss://`, `unix://`,
`redis+sentinel://` and `redis+cluster://` give the Redis store shared by every replica.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from gateway.config.model import Store
from gateway.store.base import (
    AdmissionStore,
    AdmitResult,
    NullObserver,
    RateBucket,
    SlotBucket,
    StoreError,
    StoreObserver,
)
from gateway.store.memory import MemoryStore
from gateway.store.redis import RedisStore
from gateway.store.redis_client import SCHEMES, scheme_of

__all__ = [
    "AdmissionStore",
    "AdmitResult",
    "MemoryStore",
    "NullObserver",
    "RateBucket",
    "RedisStore",
    "SlotBucket",
    "StoreError",
    "StoreObserver",
    "open_store",
]


def open_store(
    store_config: Store,
    *,
    clock: Callable[[], float] | None = None,
    observer: StoreObserver | None = None,
) -> AdmissionStore:
    """The store named by `store_config.url` (not started: call `start()`).

    `clock` (seconds) replaces the store's time source: the memory store defaults to
    time.monotonic; the Redis store defaults to Redis TIME, and a clock given here is sent
    with every call instead (tests driving time; production leaves it None).
    """
    scheme = scheme_of(store_config.url)
    if scheme == "memory":
        return MemoryStore(store_config.lease, clock=clock or time.monotonic, observer=observer)
    if scheme in SCHEMES:
        return RedisStore(
            store_config.url,
            prefix=store_config.prefix,
            timeout=store_config.timeout,
            lease=store_config.lease,
            clock=clock,
            observer=observer,
        )
    raise ValueError(f"unsupported store URL scheme {scheme!r} in {store_config.url!r}")
