"""Admin API for async jobs and keys (SPEC §5): `POST /v1/jobs/{job_id}/done` (the upstream
reports a job finished: its slot is freed, whichever key holds it) and `GET /v1/keys/{id}`
(the key's plan, effective limits after overrides, current usage of each bucket, active
slots and active jobs). Off the hot path; every answer is JSON."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.config.model import ConcurrencyLimit, Key, QuotaLimit, RateLimit
from gateway.state import GatewayState
from gateway.store.base import RateBucket, SlotBucket, StoreError

Endpoint = Callable[[Request], Awaitable[Response]]


def _error(status: int, error: str, message: str) -> JSONResponse:
    return JSONResponse({"success": False, "error": error, "message": message}, status_code=status)


def _store_unavailable() -> JSONResponse:
    return _error(503, "store_unavailable", "The store did not answer; retry.")


def job_routes(state: GatewayState, guarded: Callable[[Endpoint], Endpoint]) -> list[Route]:
    async def job_done(request: Request) -> Response:
        job_id = request.path_params["job_id"]
        try:
            ended = await state.jobs.end(job_id, None)
        except StoreError:
            return _store_unavailable()
        if ended is None:
            return _error(404, "unknown_job", f"No active job {job_id!r} holds a slot (already ended, or "
                          "not handed over yet: a handover arriving shortly is ended at once).")
        return JSONResponse({"success": True, "job_id": ended.job_id, "key_id": ended.owner, "freed": True})

    async def key_view(request: Request) -> Response:
        key_id = request.path_params["key_id"]
        routing = state.routing
        key = next((k for k in routing.config.keys if k.id == key_id), None)
        if key is None:
            return _error(404, "unknown_key", f"No key with id {key_id!r}.")
        try:
            return JSONResponse(await describe_key(state, key))
        except StoreError:
            return _store_unavailable()

    return [
        Route("/v1/jobs/{job_id}/done", guarded(job_done), methods=["POST"]),
        Route("/v1/keys/{key_id}", guarded(key_view), methods=["GET"]),
    ]


async def describe_key(state: GatewayState, key: Key) -> dict[str, Any]:
    """The key view; raises StoreError when the store cannot report usage."""
    routing = state.routing
    config = routing.config
    plan = config.plans[key.plan]
    limits: dict[str, Any] = {}
    for name, limit in plan.limits.items():
        override = key.overrides.get(name)
        item: dict[str, Any] = {
            "limit": override or limit.limit, "plan_limit": limit.limit, "override": override, "scope": limit.scope,
        }
        if isinstance(limit, RateLimit):
            item |= {"kind": "rate", "window_seconds": limit.window, "counts": limit.counts}
        elif isinstance(limit, QuotaLimit):
            item |= {"kind": "quota", "period": limit.period, "counts": limit.counts, "status": limit.status}
        elif isinstance(limit, ConcurrencyLimit):
            item |= {"kind": "concurrency", "wait_seconds": limit.wait}
        item["shadow"] = limit.shadow
        if limit.scope == "workspace" and key.workspace and override is not None:
            item["limit"] = limit.limit  # the shared budget; the override caps this key inside it
            item["key_limit"] = override
        limits[name] = item

    # Every bucket the key's requests use, once each (per-route buckets appear per route).
    rates: dict[str, tuple[RateBucket, str, list[str]]] = {}
    slots: dict[str, tuple[SlotBucket, str, list[str]]] = {}
    for index, route in enumerate(config.routes):
        compiled = routing.plan_for(key, index, route).plan
        for rate, info in zip(compiled.rates, compiled.rate_info, strict=True):
            rates.setdefault(rate.key, (rate, info.policy, []))[2].append(route.path)
        for slot, info in zip(compiled.slots, compiled.slot_info, strict=True):
            slots.setdefault(slot.key, (slot, info.policy, []))[2].append(route.path)
    rate_list, slot_list = list(rates.values()), list(slots.values())
    store = state.jobs.primary
    usage = None
    if store is not None and (rate_list or slot_list):
        usage = await store.usage([r for r, _, _ in rate_list], [s for s, _, _ in slot_list])

    buckets: list[dict[str, Any]] = []
    for n, (rate, policy, paths) in enumerate(rate_list):
        buckets.append({
            "policy": policy, "kind": "rate", "limit": rate.limit, "window_seconds": rate.window_ms / 1000,
            "routes": paths, "used": usage.rate_counts[n] if usage else None,
        })
    active_jobs: list[dict[str, Any]] = []
    active_slots: dict[str, int | None] = {}
    for n, (slot, policy, paths) in enumerate(slot_list):
        in_use = usage.slot_counts[n] if usage else None
        jobs = usage.jobs[n] if usage else []
        buckets.append({"policy": policy, "kind": "concurrency", "limit": slot.limit, "routes": paths,
                        "in_use": in_use, "jobs": len(jobs)})
        name = policy if policy not in active_slots else f"{policy}@{paths[0]}"  # per-route buckets
        active_slots[name] = in_use
        active_jobs += [
            {"job_id": job.job_id, "limit": policy, "expires_in_seconds": job.expires_in_ms / 1000} for job in jobs
        ]
    bans = config.bans
    recent_clients = []
    for ip in state.recent_clients.of(key.id):
        seconds_left = state.bans.retry_after(ip, bans)
        recent_clients.append({"ip": str(ip), "banned": seconds_left is not None, "ban_seconds_left": seconds_left})
    return {
        "id": key.id,
        "plan": key.plan,
        "workspace": key.workspace,
        "limits": limits,
        "buckets": buckets,
        "active_slots": active_slots,
        "active_jobs": active_jobs,
        # client IPs this replica saw the key used from lately (known only when bans or
        # trusted_proxies are configured), and whether each is banned now
        "recent_clients": recent_clients,
    }
