"""What every admin request passes before routing: the Host check (421, DNS rebinding), the
cross-site check (403 / 415, CSRF), and the path it is routed on.

Starlette routes on the decoded path, where `%2F` has become a real `/`: `POST
/v1/keys/dev%2Fquota` would reach the quota route of key `dev`. So the admin app routes on the
raw path, each segment decoded but for `/` and `%` (kept as `%2F` / `%25`), and the handlers
unquote their path parameters (`path_param`): an encoded slash stays inside its segment.
"""

from __future__ import annotations

from urllib.parse import unquote

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.admin.cross_site import refusal
from gateway.admin.errors import error as _error
from gateway.admin.exposure import host_allowed, listen_host
from gateway.state import GatewayState

PROBES = frozenset({"/healthz", "/readyz"})  # kubelet and load balancers: any Host

_REFUSALS = {
    "cross_origin": (403, "cross_origin_request", "The admin port takes no request that may change state from a"
                     " web page of another origin (Origin, Sec-Fetch-Site)."),
    "not_json": (415, "unsupported_media_type", "An admin request body is JSON: send Content-Type: application/json."),
}



def _misdirected() -> JSONResponse:
    return _error(421, "misdirected_request", "The admin port answers only a Host that names it (an IP address,"
                  " localhost, or an admin_hosts entry).")


def routing_path(scope: Scope) -> str:
    """The path to route on: the raw path with each segment decoded, but `%` and `/` kept encoded."""
    raw = scope.get("raw_path")
    if raw is None:  # no raw path: the decoded one, `%` kept encoded so that unquoting gives it back
        return str(scope["path"]).replace("%", "%25")
    path = raw.split(b"?", 1)[0].decode("latin-1")  # some ASGI clients put the query in raw_path
    return "/".join(unquote(part).replace("%", "%25").replace("/", "%2F") for part in path.split("/"))


def path_param(request: Request, name: str) -> str:
    """A path parameter as the client meant it (`routing_path` left `/` and `%` encoded)."""
    return unquote(request.path_params[name])


class RequestGuard:
    """ASGI wrapper: refuse a Host that does not name the admin port (421), a state change a web
    page sent (403) or a body that is not JSON (415); route on the raw path."""

    def __init__(self, app: ASGIApp, state: GatewayState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = routing_path(scope)
        if path not in PROBES:
            config = self.state.routing.config
            host = next((value.decode("latin-1") for name, value in scope["headers"] if name == b"host"), None)
            server = scope.get("server")
            port = server[1] if server else None
            if not host_allowed(host, port, listen_host(config.admin_listen), config.admin_hosts):
                await _misdirected()(scope, receive, send)
                return
        refused = refusal(scope["method"], scope["headers"])
        if refused is not None:
            status, error, message = _REFUSALS[refused]
            # closed after: the unread body must not be parsed as the next request
            await _error(status, error, message, connection="close")(scope, receive, send)
            return
        await self.app({**scope, "path": path}, receive, send)
