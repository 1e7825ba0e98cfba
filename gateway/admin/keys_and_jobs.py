"""Admin API for async jobs and keys (SPEC §5): `POST /v1/jobs/{job_id}/done` (the upstream
reports a job finished: its slot is freed, whichever key holds it) and `GET /v1/keys/{id}`
(the key's plan, effective limits after overrides, current usage of each bucket, active
slots and active jobs). Off the hot path; every answer is JSON."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.admin.errors import error as _error
from gateway.admin.guard import path_param
from gateway.admin.json_body import read_json_object
from gateway.config.model import ConcurrencyLimit, Key, QuotaLimit, RateLimit
from gateway.state import GatewayState
from gateway.store.base import QuotaBucket, QuotaUsage, RateBucket, SlotBucket, StoreError
from gateway.store.jobs import MAX_JOB_ID, valid_job_id
from gateway.usage import key_buckets, quota_usages, usage_of

Endpoint = Callable[[Request], Awaitable[Response]]

MAX_QUOTA_BODY = 1024  # bytes of a quota change: a few small fields
MAX_GRANT = 1_000_000_000  # units one grant may add (a typo of a few digits is refused, not obeyed)


@dataclass(frozen=True, slots=True)
class QuotaChange:
    grant: int  # units added to the current period (0 with reset)
    reset: bool  # the period starts again: used and granted back to 0
    limit: str | None  # the quota's name; None: every quota of the key's plan



def _store_unavailable() -> JSONResponse:
    return _error(503, "store_unavailable", "The store did not answer; retry.")


def job_routes(state: GatewayState, guarded: Callable[[Endpoint], Endpoint]) -> list[Route]:
    async def job_done(request: Request) -> Response:
        job_id = path_param(request, "job_id")
        # An id that cannot be a job's (over MAX_JOB_ID, control characters) holds no slot: no
        # store call, and no tombstone kept for it.
        valid = valid_job_id(job_id)
        try:
            ended = await state.jobs.end(valid, None) if valid is not None else None
        except StoreError:
            return _store_unavailable()
        if ended is None:
            job_id = job_id[:MAX_JOB_ID]
            return _error(404, "unknown_job", f"No active job {job_id!r} holds a slot (already ended, or "
                          "not handed over yet: a handover arriving shortly is ended at once).")
        return JSONResponse({"success": True, "job_id": ended.job_id, "key_id": ended.owner, "freed": True})

    async def key_view(request: Request) -> Response:
        key_id = path_param(request, "key_id")
        routing = state.routing
        key = next((k for k in routing.config.keys if k.id == key_id), None)
        if key is None:
            return _error(404, "unknown_key", f"No key with id {key_id!r}.")
        try:
            return JSONResponse(await describe_key(state, key))
        except StoreError:
            return _store_unavailable()

    async def quota_change(request: Request) -> Response:
        key_id = path_param(request, "key_id")
        key = next((k for k in state.routing.config.keys if k.id == key_id), None)
        if key is None:
            return _error(404, "unknown_key", f"No key with id {key_id!r}.")
        change = await read_quota_change(request, state.routing.config.client_timeout)
        if isinstance(change, Response):
            return change
        return await change_quota(state, key, change)

    return [
        Route("/v1/jobs/{job_id}/done", guarded(job_done), methods=["POST"]),
        Route("/v1/keys/{key_id}", guarded(key_view), methods=["GET"]),
        Route("/v1/keys/{key_id}/quota", guarded(quota_change), methods=["POST"]),
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
    found = key_buckets(routing, key)
    store = state.jobs.primary
    usage = None
    if store is not None and (found.rates or found.slots or found.quotas):
        usage = await usage_of(store, found)

    buckets: list[dict[str, Any]] = []
    for n, item in enumerate(found.rates):
        rate, info = cast(RateBucket, item.bucket), item.info
        buckets.append({
            "policy": info.policy, "kind": "rate", "limit": rate.limit, "window_seconds": rate.window_ms / 1000,
            "counts": "cost" if rate.counts_cost else "requests", "shadow": rate.shadow,
            "routes": item.routes, "used": usage.rate_counts[n] if usage else None,
        })
    active_jobs: list[dict[str, Any]] = []
    active_slots: dict[str, int | None] = {}
    for n, item in enumerate(found.slots):
        slot, policy, paths = cast(SlotBucket, item.bucket), item.info.policy, item.routes
        in_use = usage.slot_counts[n] if usage else None
        jobs = usage.jobs[n] if usage else []
        buckets.append({"policy": policy, "kind": "concurrency", "limit": slot.limit, "routes": paths,
                        "in_use": in_use, "jobs": len(jobs), "shadow": slot.shadow})
        name = policy if policy not in active_slots else f"{policy}@{paths[0]}"  # per-route buckets
        active_slots[name] = in_use
        active_jobs += [
            {"job_id": job.job_id, "limit": policy, "expires_in_seconds": job.expires_in_ms / 1000} for job in jobs
        ]
    quotas = quota_usages(usage, len(found.quotas)) if usage else [None] * len(found.quotas)
    for item, quota_usage in zip(found.quotas, quotas, strict=True):
        buckets.append(quota_view(cast(QuotaBucket, item.bucket), item.info.policy, item.routes, quota_usage))
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


def quota_view(quota: QuotaBucket, policy: str, routes: list[str], usage: QuotaUsage | None) -> dict[str, Any]:
    """A quota bucket in the key view: its period's use, grants and what is left."""
    view: dict[str, Any] = {
        "policy": policy, "kind": "quota", "limit": quota.limit, "period": quota.period,
        "counts": "cost" if quota.counts_cost else "requests", "shadow": quota.shadow, "routes": routes,
        "used": None, "granted": None, "remaining": None, "reset_seconds": None,
    }
    if usage is not None:
        view |= {"used": usage.used, "granted": usage.granted,
                 "remaining": max(0, quota.limit + usage.granted - usage.used),
                 "reset_seconds": -(-usage.reset_ms // 1000)}
    return view


async def read_quota_change(request: Request, timeout: float) -> QuotaChange | Response:
    """The body of `POST /v1/keys/{id}/quota`: `{"grant": N}` or `{"reset": true}`, with an
    optional `"limit": name`; at most MAX_QUOTA_BODY bytes, within `timeout` seconds. A 400
    says what is wrong (or 408, 413: gateway/admin/json_body.py)."""
    document = await read_json_object(request, limit=MAX_QUOTA_BODY, timeout=timeout,
                                      expected='{"grant": N} or {"reset": true}')
    if isinstance(document, Response):
        return document
    unknown = set(document) - {"grant", "reset", "limit"}
    if unknown:
        return _error(400, "bad_request", f"Unknown fields {sorted(unknown)}: only grant, reset and limit.")
    if None in document.values():  # a null is no value: `{"grant": null, "reset": true}` is ambiguous
        return _error(400, "bad_request", "No field is null: leave it out.")
    grant, reset, limit = document.get("grant"), document.get("reset"), document.get("limit")
    if (grant is None) == (reset is None):
        return _error(400, "bad_request", 'Send exactly one of {"grant": N} and {"reset": true}.')
    if grant is not None and (type(grant) is not int or not 1 <= grant <= MAX_GRANT):
        return _error(400, "bad_request", f"grant is a whole number of units from 1 to {MAX_GRANT}.")
    if reset is not None and reset is not True:
        return _error(400, "bad_request", 'reset is true (to start the period again) or absent.')
    if limit is not None and (not isinstance(limit, str) or not limit or len(limit) > 200):
        return _error(400, "bad_request", "limit is the name of one of the plan's quotas.")
    return QuotaChange(grant or 0, reset is True, limit)


async def change_quota(state: GatewayState, key: Key, change: QuotaChange) -> Response:
    """Apply a grant or reset to the key's quota buckets (the named quota, or all of them), in
    the shared store; answers the new usage of each."""
    found = [item for item in key_buckets(state.routing, key).quotas
             if change.limit is None or item.info.name == change.limit]
    if not found:
        what = f"no quota named {change.limit!r}" if change.limit else "no quota"
        return _error(400, "not_a_quota", f"The {key.plan} plan of key {key.id!r} has {what}.")
    views = []
    try:
        for item in found:
            quota = cast(QuotaBucket, item.bucket)
            adjust = state.store.adjust_quota  # type: ignore[attr-defined]
            usage = await adjust(quota, grant=change.grant, reset=change.reset)
            views.append(quota_view(quota, item.info.policy, item.routes, usage))
    except StoreError:
        return _store_unavailable()
    finally:
        state.admission.refusals.clear()  # this process honours the change at once, others within 1 s
    return JSONResponse({"success": True, "key_id": key.id, "quotas": views})
