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
import time
from json.encoder import encode_basestring_ascii
from typing import IO

from gateway import log_writer
from gateway.asgi import Scope

_json = encode_basestring_ascii  # a str as a JSON string, exactly as json.dumps writes it


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
    """One access-log line, without its newline. Each optional field is written in place
    (`null`, or the value): a helper function per field cost more than the field."""
    method, path = scope.get("method"), scope.get("path")
    return (
        f'{{"time":{now:.3f},"key":{"null" if key_id is None else _json(key_id)},'
        f'"plan":{_json(plan)},"route":{_json(route)},'
        f'"method":{"null" if method is None else _json(method)},"path":{"null" if path is None else _json(path)},'
        f'"status":{status:d},"outcome":{_json(outcome)},'
        f'"admission_ms":{"null" if admission_s is None else "%.3f" % (admission_s * 1000)},'
        f'"upstream_ms":{"null" if upstream_s is None else "%.3f" % (upstream_s * 1000)},'
        f'"client":{"null" if client is None else _json(client)}}}'
    )


class AccessLog:
    def __init__(self, stream: IO[str] | None = None) -> None:
        if stream is None:
            # stdout, written by a thread of its own: a reader that stops reading must never
            # block the event loop (gateway/log_writer.py); the thread flushes after each write,
            # so the lines reach `docker logs` at once
            stream = log_writer.stdout()
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
