"""One structured JSON line per request, to stdout.

Fields: time, key (public id), plan, route (the pattern, not the path), method, path (without
the query string, which may carry the API key), status, outcome, admission and upstream
milliseconds, client (the client IP: the socket peer, or the address resolved through
`identity.trusted_proxies` when the app passes it). Never a secret: the key itself, headers
and the query string are not logged.

Cheap on the hot path: each line is formatted directly, compact JSON (no spaces), strings
escaped by json's own C escaper (non-ASCII as `\\u` escapes, as `json.dumps` does), times with three
decimals (`time` in seconds, the durations in milliseconds). The lines of one event-loop
iteration are written together, with one write, by a callback the first line schedules, so
they reach `docker logs` at once. `flush()` writes what is pending now (the server calls it on
shutdown).
"""

from __future__ import annotations

import asyncio
import io
import sys
import time
from json.encoder import encode_basestring_ascii
from typing import IO

from gateway.asgi import Scope

_json = encode_basestring_ascii  # a str as a JSON string, exactly as json.dumps writes it


def _string(value: str | None) -> str:
    return "null" if value is None else _json(value)


def _milliseconds(seconds: float | None) -> str:
    return "null" if seconds is None else "%.3f" % (seconds * 1000)


def format_line(
    scope: Scope,
    status: int,
    outcome: str,
    key_id: str | None,
    plan: str,
    route: str,
    admission_s: float | None,
    upstream_s: float | None,
    client: str | None,
    now: float,
) -> str:
    """One access-log line, without its newline."""
    return (
        f'{{"time":{now:.3f},"key":{_string(key_id)},"plan":{_json(plan)},"route":{_json(route)},'
        f'"method":{_string(scope.get("method"))},"path":{_string(scope.get("path"))},"status":{status:d},'
        f'"outcome":{_json(outcome)},"admission_ms":{_milliseconds(admission_s)},'
        f'"upstream_ms":{_milliseconds(upstream_s)},"client":{_string(client)}}}'
    )


class AccessLog:
    def __init__(self, stream: IO[str] | None = None) -> None:
        if stream is None:
            stream = sys.stdout
            if isinstance(stream, io.TextIOWrapper):
                stream.reconfigure(line_buffering=True)  # each flush below reaches `docker logs` at once
        self._stream = stream
        self._pending: list[str] = []

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
        line = format_line(scope, status, outcome, key_id, plan, route, admission_s, upstream_s, client, time.time())
        pending = self._pending
        pending.append(line)
        if len(pending) == 1:
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        try:
            asyncio.get_running_loop().call_soon(self.flush)
        except RuntimeError:  # no event loop (a synchronous caller): write at once
            self.flush()

    def flush(self) -> None:
        """Write every pending line (one write); safe to call at any time, also when none is."""
        if not self._pending:
            return
        lines, self._pending = self._pending, []
        lines.append("")  # the last line's newline
        try:
            self._stream.write("\n".join(lines))
        except (OSError, ValueError):  # a closed or broken stdout must never fail a request
            pass
