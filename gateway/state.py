"""The process-wide resources one gateway worker runs on, opened and closed in order.

Open: store (scripts loaded, heartbeat and release flusher started) → ban sync → upstream client.
Close, in reverse: upstream client → bans (sync stopped, strikes flushed) → store (pending
releases flushed, loops stopped).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from gateway.admission.controller import Admission
from gateway.ban_guard import BanGuard
from gateway.config.model import Config
from gateway.config.store_url import redact
from gateway.jobs.tracker import JobTracker
from gateway.metrics import Metrics, MetricsObserver
from gateway.proxy.upstream import UpstreamClient, create_upstream_client
from gateway.recent_clients import RecentClients
from gateway.runtime import Routing
from gateway.store import bundle_for, open_store
from gateway.store.base import AdmissionStore, StoreError

log = logging.getLogger("gateway.store")


@dataclass(slots=True)
class GatewayState:
    routing: Routing
    store: AdmissionStore
    admission: Admission
    upstream: UpstreamClient
    metrics: Metrics
    local_store: AdmissionStore | None = None
    draining: bool = False
    recent_clients: RecentClients = field(default_factory=RecentClients)  # for the admin key view
    active_requests: int = 0
    bans: BanGuard = field(init=False)  # set by create(): its policy follows config reloads
    jobs: JobTracker = field(init=False)  # set by create(): slots held by async jobs

    @classmethod
    def create(
        cls,
        config: Config,
        *,
        metrics: Metrics | None = None,
        store: AdmissionStore | None = None,
        upstream: UpstreamClient | None = None,
    ) -> GatewayState:
        metrics = metrics or Metrics()
        observer = MetricsObserver(metrics)
        stores = (bundle_for(store, config.store, observer) if store is not None
                  else open_store(config.store, observer=observer))
        store, local = stores.admission, stores.local
        admission = Admission(store, on_error=config.store.on_error, metrics=metrics, local=local,
                              local_divisor=config.store.local_divisor)
        state = cls(
            routing=Routing.build(config),
            store=store,
            admission=admission,
            upstream=upstream or create_upstream_client(config.upstream),
            metrics=metrics,
            local_store=local,
        )
        state.bans = BanGuard(stores.bans, metrics, policy=lambda: state.routing.config.bans)
        state.jobs = JobTracker(stores.job_stores())
        return state

    async def open(self) -> None:
        if self.local_store is not None:
            await self.local_store.start()
        try:
            await self.store.start()
        except StoreError as exc:
            # Serve anyway: on_error decides until the store answers (it reconnects by itself).
            # Said now: a store that refuses this gateway (a wrong password, maxclients, an ACL)
            # would otherwise show nowhere until a client request failed.
            log.warning("store %s failed at start, deciding by on_error: %s until it answers: %s",
                        redact(self.routing.config.store.url), self.admission.on_error, exc)
            self.admission.breaker.failure()
        await self.bans.start()

    async def aclose(self) -> None:
        await self.upstream.aclose()
        await self.bans.aclose()
        await self.store.aclose()
        if self.local_store is not None:
            await self.local_store.aclose()
