"""The one door into the stores: `open_store` picks the backend from the configured URL and
returns everything backend-specific at once (`StoreBundle`).

`memory://` gives the in-process store (one process); `redis://`, `rediss://`, `unix://`,
`redis+sentinel://` and `redis+cluster://` give the Redis store shared by every replica.
Nothing outside `gateway/store/` names a concrete store class or picks a backend: the bundle
carries the ban store and the job stores that go with each admission store (the shared one and
the local fallback).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.config.model import Store
from gateway.config.store_url import StoreUrlError, redact
from gateway.store.bans import BanStore, MemoryBanStore
from gateway.store.base import (
    AdmissionStore,
    AdmitResult,
    NullObserver,
    RateBucket,
    SlotBucket,
    StoreError,
    StoreObserver,
    StoreRejected,
)
from gateway.store.jobs import JobStore
from gateway.store.memory import MemoryStore
from gateway.store.redis import RedisStore
from gateway.store.redis_bans import RedisBanStore
from gateway.store.redis_client import SCHEMES, scheme_of
from gateway.store.redis_jobs import RedisJobStore

__all__ = [
    "AdmissionStore",
    "AdmitResult",
    "MemoryStore",
    "NullObserver",
    "RateBucket",
    "RedisStore",
    "SlotBucket",
    "StoreBundle",
    "StoreError",
    "StoreObserver",
    "StoreRejected",
    "bundle_for",
    "open_store",
]


@dataclass(slots=True)
class StoreBundle:
    """What one gateway worker keeps its state in, opened together from `store.url`."""

    admission: AdmissionStore
    bans: BanStore  # bans live where the admission state lives: Redis shares them
    jobs: JobStore | None  # jobs too (None: this admission store cannot hold jobs)
    # `on_error: local` with a shared store: the in-memory store that decides while it cannot,
    # and where the jobs it admits are held.
    local: AdmissionStore | None = None
    local_jobs: JobStore | None = None

    def job_stores(self) -> tuple[tuple[AdmissionStore, JobStore], ...]:
        """Each admission store with the store of its jobs, the shared one first."""
        pairs = ((self.admission, self.jobs), (self.local, self.local_jobs))
        return tuple((store, jobs) for store, jobs in pairs if store is not None and jobs is not None)


def bundle_for(
    admission: AdmissionStore, store_config: Store, observer: StoreObserver | None = None
) -> StoreBundle:
    """The bundle around an admission store (opened here, or built by a test)."""
    prefix = store_config.prefix
    local = None
    if store_config.on_error == "local" and not isinstance(admission, MemoryStore):
        local = MemoryStore(store_config.lease, observer=observer)
    return StoreBundle(
        admission,
        _ban_store_for(admission, prefix, observer),
        _job_store_for(admission, prefix, observer),
        local,
        _job_store_for(local, prefix, observer) if local is not None else None,
    )


def _ban_store_for(store: AdmissionStore, prefix: str, observer: StoreObserver | None = None) -> BanStore:
    """Bans live where the admission state lives: Redis shares them between replicas."""
    if isinstance(store, RedisStore):
        return RedisBanStore(store, prefix=prefix, observer=observer)
    return MemoryBanStore()


def _job_store_for(store: AdmissionStore, prefix: str, observer: StoreObserver | None = None) -> JobStore | None:
    """Jobs live where the admission state lives (None: this store cannot hold jobs)."""
    if isinstance(store, RedisStore):
        return RedisJobStore(store, prefix=prefix, observer=observer)
    if isinstance(store, MemoryStore):
        return store
    return None


def open_store(
    store_config: Store,
    *,
    clock: Callable[[], float] | None = None,
    observer: StoreObserver | None = None,
) -> StoreBundle:
    """The stores named by `store_config.url` (not started: call `start()` on each).

    `clock` (seconds) replaces the store's time source: the memory store defaults to
    time.monotonic; the Redis store defaults to Redis TIME, and a clock given here is sent
    with every call instead (tests driving time; production leaves it None).
    """
    return bundle_for(_admission_store(store_config, clock, observer), store_config, observer)


def _admission_store(
    store_config: Store, clock: Callable[[], float] | None, observer: StoreObserver | None
) -> AdmissionStore:
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
    raise StoreUrlError(f"unsupported store URL scheme {scheme!r} in {redact(store_config.url)!r}")
