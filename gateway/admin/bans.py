"""The admin API for IP bans: `GET /v1/bans` lists the active bans (from the store, so every
replica's bans), `DELETE /v1/bans/{ip}` lifts one (an address, or a banned IPv6 group as the
list names it: its prefix of exactly `ipv6_prefix` bits). Both sit behind `admin_token` (the
admin app's `guarded`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.admin.errors import error as _error
from gateway.admin.guard import path_param
from gateway.admission.bans import STRIKE_KINDS, retry_after
from gateway.ban_guard import BanGuard
from gateway.store.base import StoreError

Endpoint = Callable[[Request], Awaitable[Response]]



def _store_unavailable() -> JSONResponse:
    return _error(503, "store_unavailable", "The ban store did not answer; retry.")


def ban_routes(guard: BanGuard, guarded: Callable[[Endpoint], Endpoint]) -> list[Route]:
    async def list_bans(request: Request) -> Response:
        """[{"ip": "203.0.113.7" | "2001:db8:a::/64", "seconds_left": N, "until": unix, "ban_count": n,
        "strikes": {"unauthorized": u, "rate": r, "concurrency": c}}]: `strikes` are the strikes
        by kind that earned the ban (why it was banned)."""
        try:
            entries = await guard.list_active()
        except StoreError:
            return _store_unavailable()
        return JSONResponse(
            [
                {
                    "ip": entry.group,
                    "seconds_left": retry_after(entry.seconds_left),
                    "until": entry.until,
                    "ban_count": entry.bans,
                    "strikes": dict(zip(STRIKE_KINDS, entry.kinds, strict=True)),
                }
                for entry in entries
            ]
        )

    async def lift_ban(request: Request) -> Response:
        text = path_param(request, "ip")
        group = guard.group_for(text)
        if group is None:
            return _error(400, "bad_ip", f"{text!r} is not an IP address or an IPv6 prefix as GET /v1/bans"
                          " lists it.")
        try:
            lifted = await guard.lift(group)
        except StoreError:
            return _store_unavailable()
        if not lifted:
            return _error(404, "not_banned", f"{group} is not banned.")
        return JSONResponse({"success": True, "ip": group, "lifted": True})

    return [
        Route("/v1/bans", guarded(list_bans), methods=["GET"]),
        Route("/v1/bans/{ip:path}", guarded(lift_ban), methods=["DELETE"]),
    ]
