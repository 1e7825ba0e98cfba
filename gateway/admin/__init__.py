"""The admin port (SPEC §5): metrics, health, readiness and the admin API.

Served only on `admin_listen`, by its own server, never through the public port. Off the hot
path, so Starlette's routing is fine here. When `admin_token` is set, everything but
`/healthz` wants `Authorization: Bearer <token>` (compared in constant time). Before that,
`gateway.admin.guard` refuses what a web page in the operator's browser could send: another
Host (421, DNS rebinding) and, for a request that may change state, another Origin (403) or a
body that is not JSON (415).
"""

from __future__ import annotations

import hmac

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from gateway.admin.bans import ban_routes
from gateway.admin.guard import RequestGuard
from gateway.admin.keys_and_jobs import job_routes
from gateway.admin.readiness import check_readiness
from gateway.state import GatewayState


def _authorized(request: Request, token: str | None) -> bool:
    if not token:
        return True
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


_UNKNOWN = {404: ("not_found", "No such admin path."), 405: ("method_not_allowed", "The admin path does not take this method.")}


async def _unknown_path(request: Request, exc: Exception) -> Response:
    """An unknown path or method: the JSON body of every other admin error (Starlette's own is
    plain text), with the `Allow` header of a 405."""
    assert isinstance(exc, HTTPException)
    error, message = _UNKNOWN[exc.status_code]
    return JSONResponse({"success": False, "error": error, "message": message}, status_code=exc.status_code,
                        headers=exc.headers)


def _unauthorized() -> JSONResponse:
    return JSONResponse(
        {"success": False, "error": "unauthorized", "message": "The admin API wants Authorization: Bearer <token>."},
        status_code=401,
        headers={"www-authenticate": "Bearer"},
    )


def create_admin_app(state: GatewayState) -> ASGIApp:
    def guarded(handler):  # type: ignore[no-untyped-def]
        async def endpoint(request: Request) -> Response:
            if not _authorized(request, state.routing.config.admin_token):
                return _unauthorized()
            return await handler(request)  # type: ignore[no-any-return]

        return endpoint

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        # 200 "degraded" while the store is down under on_error local/allow: see gateway/admin/readiness.py
        answer = await check_readiness(state, strict="strict" in request.query_params)
        return JSONResponse(answer.body, status_code=answer.status_code)

    async def metrics(request: Request) -> Response:
        return Response(state.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    app = Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", guarded(readyz)),
            Route("/metrics", guarded(metrics)),
            *ban_routes(state.bans, guarded),
            *job_routes(state, guarded),
        ],
        exception_handlers={404: _unknown_path, 405: _unknown_path},
    )
    app.router.redirect_slashes = False  # `/metrics/` is no admin path: 404, not a redirect
    return RequestGuard(app, state)
