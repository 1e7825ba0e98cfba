"""The process-wide resources one gateway worker runs on, opened and closed in order.

Open: store (scripts loaded, heartbeat and release flusher started) → ban sync → upstream client.
Close, in reverse: upstream client → bans (sync stopped, strikes flushed) → store (pending
releases flushed, loops stopped).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.admission.controller import Admission
from gateway.ban_guard import BanGuard, ban_store_for
from gateway.config.model import Config
from gateway.jobs.tracker import JobTracker
from gateway.metrics import Metrics, MetricsObserver
from gateway.proxy.upstream import UpstreamClient, create_upstream_client
from gateway.recent_clients import RecentClients
from gateway.runtime import Routing
from gateway.store import open_store
from gateway.store.base import AdmissionStore, StoreError
from gateway.store.memory import MemoryStore


@dataclass(slots=True)
class GatewayState:
    routing: Routing
    store: AdmissionStore
    admission: Admission
    upstream: UpstreamClient
    metrics: Metrics
    local_store: MemoryStore | None = None
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
        store = store or open_store(config.store, observer=observer)
        local = None
        if config.store.on_error == "local" and not isinstance(store, MemoryStore):
            local = MemoryStore(config.store.lease, observer=observer)
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
        ban_store = ban_store_for(store, config.store.prefix, observer)
        state.bans = BanGuard(ban_store, metrics, policy=lambda: state.routing.config.bans)
        state.jobs = JobTracker(store, local, config.store.prefix, observer)
        return state

    async def open(self) -> None:
        if self.local_store is not None:
            await self.local_store.start()
        try:
            await self.store.start()
        except StoreError:
            # Serve anyway: on_error decides until the store answers (it reconnects by itself).
            self.admission.breaker.failure()
        await self.bans.start()

    async def aclose(self) -> None:
        await self.upstream.aclose()
        await self.bans.aclose()
        await self.store.aclose()
        if self.local_store is not None:
            await self.local_store.aclose()
