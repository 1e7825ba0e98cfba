"""One structured JSON line per request, to stdout.

Fields: time, key (public id), plan, route (the pattern, not the path), method, path (without
the query string, which may carry the API key), status, outcome, admission and upstream
milliseconds, client (the client IP: the socket peer, or the address resolved through
`identity.trusted_proxies` when the app passes it). Never a secret: the key itself, headers
and the query string are not logged.
"""

from __future__ import annotations

import io
import json
import sys
import time
from typing import IO

from gateway.asgi import Scope


class AccessLog:
    def __init__(self, stream: IO[str] | None = None) -> None:
        if stream is None:
            stream = sys.stdout
            if isinstance(stream, io.TextIOWrapper):
                stream.reconfigure(line_buffering=True)  # each line reaches `docker logs` at once
        self._stream = stream

    def write(
        self,
        scope: Scope,
        status: int,
        outcome: str,
        key_id: str | None,
        plan: str,
        route: str,
        admission_s: float | None,
        upstream_s: float | None,
        client: str | None = None,
    ) -> None:
        if client is None:
            peer = scope.get("client")
            client = peer[0] if peer else None
        line = json.dumps(
            {
                "time": round(time.time(), 3),
                "key": key_id,
                "plan": plan,
                "route": route,
                "method": scope.get("method"),
                "path": scope.get("path"),
                "status": status,
                "outcome": outcome,
                "admission_ms": None if admission_s is None else round(admission_s * 1000, 3),
                "upstream_ms": None if upstream_s is None else round(upstream_s * 1000, 3),
                "client": client,
            },
            separators=(",", ":"),
        )
        try:
            self._stream.write(line + "\n")
        except (OSError, ValueError):  # a closed or broken stdout must never fail a request
            pass
