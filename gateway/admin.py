"""The admin port (SPEC §5): metrics, health, readiness and the admin API.

Served only on `admin_listen`, by its own server, never through the public port. Off the hot
path, so Starlette's routing is fine here. When `admin_token` is set, everything but
`/healthz` wants `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import asyncio
import hmac

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.state import GatewayState
from gateway.store.base import StoreError


def _authorized(request: Request, token: str | None) -> bool:
    if not token:
        return True
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def _unauthorized() -> JSONResponse:
    return JSONResponse(
        {"success": False, "error": "unauthorized", "message": "The admin API wants Authorization: Bearer <token>."},
        status_code=401,
        headers={"www-authenticate": "Bearer"},
    )


def create_admin_app(state: GatewayState) -> Starlette:
    def guarded(handler):  # type: ignore[no-untyped-def]
        async def endpoint(request: Request) -> Response:
            if not _authorized(request, state.routing.config.admin_token):
                return _unauthorized()
            return await handler(request)  # type: ignore[no-any-return]

        return endpoint

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        if state.draining:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        try:
            async with asyncio.timeout(max(0.5, 2 * state.routing.config.store.timeout)):
                await state.store.check_ready()
        except (StoreError, TimeoutError) as exc:
            return JSONResponse({"status": "store_unavailable", "detail": type(exc).__name__}, status_code=503)
        return JSONResponse({"status": "ready"})

    async def metrics(request: Request) -> Response:
        return Response(state.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", guarded(readyz)),
            Route("/metrics", guarded(metrics)),
        ]
    )
