"""The process-wide resources one gateway worker runs on, opened and closed in order.

Open: store (scripts loaded, heartbeat and release flusher started) → upstream client.
Close, in reverse: upstream client → store (pending releases flushed, loops stopped).
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.admission.controller import Admission
from gateway.config.model import Config
from gateway.metrics import Metrics, MetricsObserver
from gateway.proxy.upstream import UpstreamClient, create_upstream_client
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
    active_requests: int = 0
    store_started: bool = False

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
        admission = Admission(store, on_error=config.store.on_error, metrics=metrics, local=local)
        return cls(
            routing=Routing.build(config),
            store=store,
            admission=admission,
            upstream=upstream or create_upstream_client(config.upstream),
            metrics=metrics,
            local_store=local,
        )

    async def open(self) -> None:
        if self.local_store is not None:
            await self.local_store.start()
        try:
            await self.store.start()
            self.store_started = True
        except StoreError:
            # Serve anyway: on_error decides until the store answers (it reconnects by itself).
            self.admission.breaker.failure()

    async def aclose(self) -> None:
        await self.upstream.aclose()
        await self.store.aclose()
        if self.local_store is not None:
            await self.local_store.aclose()
