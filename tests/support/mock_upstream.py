"""A raw asyncio HTTP/1.1 upstream for tests: raw so that it can misbehave on purpose.

Three ways to run it:
- in the test's own loop: `async with MockUpstream() as upstream:` (or `start()` / `stop()`);
- in a background thread with its own loop: `with ThreadedMockUpstream() as upstream:`;
- as a process several gateways share: `python -m tests.support.mock_upstream --port N`
  (prints `listening on HOST:PORT` when ready; counters at `GET /_stats`, cleared by `POST /_reset`).

It records per key id (the `X-Gateway-Key-Id` request header, "-" when absent): arrivals (monotonic
and wall-clock times), in-flight and max in-flight, disconnects seen, and the last request.

Credits (issue 18): with a `Pricing` (constructor, `--pricing JSON`, or `POST /_pricing` with the
JSON body; it survives `/_reset`) every request is priced by the same first-match rules as the
gateway's `routes[].cost`, and per key it records each arrival's price (`costs`), slots
(`slots`) and the charge it expects the gateway to settle (`settled`: the declared cost, or the
price; 0 for a non-2xx answer under `success_only`), plus weighted slots in flight
(`slots_in_flight`, `max_slots_in_flight`). On any path but the control ones, `declare=V` sends
`V` in the pricing's cost header (repeat it for several header lines) and `fail=N` answers status
N instead of 200.

Behaviour by path (query parameters in brackets):
- `/hold` [ms=30000]: answer after ms, or as soon as `POST /_release` (or `release()`) is called
- `/delay_headers` [ms=0]: send nothing for ms, then answer like echo
- `/download` [bytes, mode=length|chunked, ms=0 between 64 KiB blocks]: `download_blocks()` bytes
- `/upload`: count the body without keeping it; answer `{"bytes": n, "sha256": hex}`
- `/abort_mid_body` [mode=length|chunked, how=close|reset]: half a body, then drop the connection
- `/gzip`: `GZIP_BODY` with `Content-Encoding: gzip` and its `Content-Length`
- `/status/N`: that status, a small JSON body (none for 1xx, 204, 304)
- `/invalid_headers` [kind=ctl|nul|nocolon|space|huge|status|status600|status099|switching]: a
  response no client should accept (the last three: a status that is no final answer)
- `/not_modified`: a 304 with `ETag` and the `Content-Length: 100` a 200 would have had
- `/close_immediately`: read the request, close without answering
- `/early_response` [status=413]: answer before reading the request body, then close
- `/response_headers`: hop-by-hop headers, a `Connection`-named header, two Set-Cookie lines
- `/own_limit_headers`: the upstream's own limit and charge headers (`OWN_LIMIT_HEADERS`), as a
  provider reporting the gateway operator's account answers (ZenRows sends `Concurrency-*`)
- `/extra_response` [ms=50, kind=poison|timeout]: answer, then ms later, on the idle connection,
  a second whole response nobody asked for (`{"poisoned": true}`), or a 408 and the close
- `POST /jobs` [ms=30000, status=201, noid=0, webhook=URL, webhook_first=0, delay_ms=0,
  answer_ms=0]: start an async job for the key (after delay_ms, unless the client left) that
  finishes after ms; answers `{"id": ..., "status": "queued"}` answer_ms after starting it
  (whether or not the client is still there); no id with noid=1; with status >= 300 no job.
  With `webhook`, the job's end is POSTed there (the admin `done` call; `{id}` in it is
  replaced), before the answer when webhook_first=1.
- `GET /jobs/{id}`: `{"id", "status": queued|running|completed|cancelled}` (404 if unknown);
  `DELETE /jobs/{id}`: cancels it. `POST /_jobs/finish` ends every job now.
  Per key, `/_stats` counts `jobs_created`, `jobs_active` now and `jobs_max_active` ever.
- anything else: echo `{"method", "path", "query", "headers": [[name, value]...], "body_length",
  "body_sha256", "body"}` (body: the first 64 KiB, latin-1)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import hashlib
import json
import random
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from gateway.store.base import MAX_COST

KEY_HEADER = "x-gateway-key-id"
BLOCK_SIZE = 64 * 1024
_BLOCK = random.Random(20240601).randbytes(BLOCK_SIZE)
GZIP_PLAIN = b'{"message": "compressed on purpose"}\n' * 200
GZIP_BODY = gzip.compress(GZIP_PLAIN, mtime=0)
_ECHO_BODY_LIMIT = 64 * 1024


def download_blocks(total: int) -> Iterator[bytes]:
    """The bytes `/download?bytes=total` sends (and a test can upload): 64 KiB blocks, each
    numbered, so a lost, repeated or reordered block changes the hash."""
    index = 0
    while total > 0:
        block = index.to_bytes(8, "big") + _BLOCK[8:]
        yield block[:total]
        total -= len(block)
        index += 1


def download_sha256(total: int) -> str:
    digest = hashlib.sha256()
    for block in download_blocks(total):
        digest.update(block)
    return digest.hexdigest()


@dataclass
class KeyStats:
    arrivals: list[float] = field(default_factory=list)  # time.monotonic()
    arrivals_wall: list[float] = field(default_factory=list)  # time.time()
    in_flight: int = 0
    max_in_flight: int = 0
    completed: int = 0  # a full response was written
    disconnects: int = 0  # the client went away before the response was complete
    disconnect_times: list[float] = field(default_factory=list)  # time.monotonic()
    incomplete_bodies: int = 0  # request bodies that ended before their declared end
    last: dict[str, Any] | None = None
    jobs_created: int = 0
    jobs_max_active: int = 0  # most jobs of this key active at one moment
    costs: list[int] = field(default_factory=list)  # each arrival's price (parallel to arrivals)
    slots: list[int] = field(default_factory=list)  # each arrival's slots
    settled: list[int] = field(default_factory=list)  # each arrival's expected settled charge
    slots_in_flight: int = 0
    max_slots_in_flight: int = 0

    def units_by_day(self) -> dict[str, int]:
        """Units received per UTC day (a `1d` quota's period), by ISO date."""
        days: dict[str, int] = {}
        for wall, cost in zip(self.arrivals_wall, self.costs, strict=False):
            day = time.strftime("%Y-%m-%d", time.gmtime(wall))
            days[day] = days.get(day, 0) + cost
        return days

    def to_json(self) -> dict[str, Any]:
        return {
            "arrivals": list(self.arrivals),
            "arrivals_wall": list(self.arrivals_wall),
            "total": len(self.arrivals),
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "completed": self.completed,
            "disconnects": self.disconnects,
            "disconnect_times": list(self.disconnect_times),
            "incomplete_bodies": self.incomplete_bodies,
            "last": self.last,
            "jobs_created": self.jobs_created,
            "jobs_max_active": self.jobs_max_active,
            "costs": list(self.costs),
            "slots": list(self.slots),
            "settled": list(self.settled),
            "units": sum(self.costs),
            "units_by_day": self.units_by_day(),
            "settled_units": sum(self.settled),
            "slots_in_flight": self.slots_in_flight,
            "max_slots_in_flight": self.max_slots_in_flight,
        }


@dataclass
class MockJob:
    id: str
    key: str
    created: float
    duration: float
    cancelled: bool = False
    finished: bool = False  # ended early by /_jobs/finish

    def status(self, now: float) -> str:
        if self.cancelled:
            return "cancelled"
        if self.finished or now - self.created >= self.duration:
            return "completed"
        return "queued" if now - self.created < min(0.05, self.duration) else "running"

    def active(self, now: float) -> bool:
        return self.status(now) in ("queued", "running")


COST_HEADER = "X-Upstream-Cost"


@dataclass(frozen=True)
class PriceRule:
    """One `routes[].cost` rule: every condition must hold (a repeated query parameter matches
    when any of its values does, as in the gateway)."""

    cost: int
    slots: int = 1
    method: str | None = None
    query: tuple[tuple[str, str], ...] = ()
    headers: tuple[tuple[str, str], ...] = ()

    def matches(self, request: _Request) -> bool:
        if self.method is not None and request.method != self.method:
            return False
        if any(value not in request.query.get(name, ()) for name, value in self.query):
            return False
        return all(
            any(k.lower() == name and v == value for k, v in request.headers) for name, value in self.headers
        )


@dataclass(frozen=True)
class Pricing:
    """What the upstream expects the gateway to charge: its own copy of the route's cost rules,
    the header it declares a cost in, and whether non-2xx answers are free."""

    rules: tuple[PriceRule, ...] = ()
    cost_header: str = COST_HEADER
    success_only: bool = False

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Pricing:
        """`{"rules": [{"cost", "slots", "method", "query": {}, "headers": {}}], "cost_header",
        "success_only"}` (the `when` of a config rule, flattened)."""
        rules = tuple(
            PriceRule(
                int(rule["cost"]), int(rule.get("slots", 1)), rule.get("method"),
                tuple(sorted(rule.get("query", {}).items())),
                tuple(sorted((k.lower(), v) for k, v in rule.get("headers", {}).items())),
            )
            for rule in value.get("rules", ())
        )
        return cls(rules, value.get("cost_header", COST_HEADER), bool(value.get("success_only", False)))

    def price(self, request: _Request) -> tuple[int, int]:
        """(cost, slots) of the first matching rule; (1, 1) when none does."""
        for rule in self.rules:
            if rule.matches(request):
                return rule.cost, rule.slots
        return 1, 1

    def settle(self, price: int, declared: list[str], status: int) -> int:
        """The charge the gateway should settle: the first declared value (of the first line,
        before any comma) when it is an integer 0..MAX_COST (above it: MAX_COST), else the price;
        0 for a non-2xx under success_only."""
        if self.success_only and not 200 <= status < 300:
            return 0
        first = declared[0].split(",", 1)[0].strip(" \t") if declared else ""  # a header's first value
        if re.fullmatch(r"[0-9]+", first):
            return min(int(first), MAX_COST)
        return price


@dataclass
class Stats:
    keys: dict[str, KeyStats] = field(default_factory=dict)
    connections: int = 0  # TCP connections accepted
    jobs: dict[str, MockJob] = field(default_factory=dict)

    def active_jobs(self, key_id: str) -> int:
        now = time.monotonic()
        return sum(1 for job in self.jobs.values() if job.key == key_id and job.active(now))

    def key(self, key_id: str) -> KeyStats:
        stats = self.keys.get(key_id)
        if stats is None:
            stats = self.keys[key_id] = KeyStats()
        return stats

    def to_json(self) -> dict[str, Any]:
        keys = {k: v.to_json() | {"jobs_active": self.active_jobs(k)} for k, v in self.keys.items()}
        return {"connections": self.connections, "keys": keys}


class _ClientGone(Exception):
    pass


@dataclass
class _Request:
    method: str
    target: str
    path: str
    query: dict[str, list[str]]
    raw_query: str
    headers: list[tuple[str, str]]

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    def arg(self, name: str, default: str) -> str:
        return self.query.get(name, [default])[0]

    def int_arg(self, name: str, default: int) -> int:
        return int(self.arg(name, str(default)))


def _parse_head(head: bytes) -> _Request:
    lines = head[:-4].split(b"\r\n")
    method, target, _version = lines[0].decode("latin-1").split(" ", 2)
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, _, value = line.decode("latin-1").partition(":")
        headers.append((name.strip(), value.strip()))
    path, _, raw_query = target.partition("?")
    return _Request(method, target, path, parse_qs(raw_query, keep_blank_values=True), raw_query, headers)


class _Body:
    """The request body, read as it arrives (Content-Length or chunked), counted and hashed."""

    def __init__(self, reader: asyncio.StreamReader, request: _Request) -> None:
        self.reader = reader
        length = request.header("content-length")
        self.chunked = "chunked" in (request.header("transfer-encoding") or "").lower()
        self.remaining = int(length) if length is not None and not self.chunked else 0
        self.length = 0
        self.digest = hashlib.sha256()
        self.kept = bytearray()
        self.complete = False

    def _take(self, data: bytes) -> None:
        self.length += len(data)
        self.digest.update(data)
        if len(self.kept) < _ECHO_BODY_LIMIT:
            self.kept += data[: _ECHO_BODY_LIMIT - len(self.kept)]

    async def consume(self) -> None:
        try:
            if self.chunked:
                await self._chunked()
            else:
                while self.remaining > 0:
                    data = await self.reader.read(min(self.remaining, BLOCK_SIZE))
                    if not data:
                        raise _ClientGone
                    self.remaining -= len(data)
                    self._take(data)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise _ClientGone from exc
        self.complete = True

    async def _chunked(self) -> None:
        while True:
            size_line = await self.reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while await self.reader.readuntil(b"\r\n") != b"\r\n":
                    pass  # trailers
                return
            while size > 0:
                data = await self.reader.read(min(size, BLOCK_SIZE))
                if not data:
                    raise _ClientGone
                size -= len(data)
                self._take(data)
            await self.reader.readexactly(2)


class _Exchange:
    """One request on one connection: the body, the disconnect watch, the response writers."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: _Request) -> None:
        self.reader = reader
        self.writer = writer
        self.request = request
        self.body = _Body(reader, request)
        self._eof: asyncio.Future[bytes] | None = None
        self.reusable = request.header("connection") != "close"
        self.extra_headers: list[tuple[str, str]] = []  # `declare=`: the declared cost
        self.fail_status = 0  # `fail=N`: a 200 answer goes out as N
        self.status_sent = 0

    def watch(self) -> None:
        """After the body: notice the client closing while the response is pending."""
        self._eof = asyncio.ensure_future(self.reader.read(1))

    @property
    def gone(self) -> bool:
        eof = self._eof
        if eof is None or not eof.done():
            return False
        return eof.cancelled() or eof.exception() is not None or not eof.result()

    async def wait(self, seconds: float, release: asyncio.Event | None = None) -> None:
        """Sleep, but raise `_ClientGone` the moment the client closes."""
        if self._eof is None:
            self.watch()
        assert self._eof is not None
        waiters: set[asyncio.Future[Any]] = {self._eof, asyncio.ensure_future(asyncio.sleep(seconds))}
        if release is not None:
            waiters.add(asyncio.ensure_future(release.wait()))
        done, pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for future in pending:
            if future is not self._eof:
                future.cancel()
        if self.gone:
            raise _ClientGone

    async def finish(self) -> None:
        """Stop the disconnect watch; the connection may read its next request afterwards."""
        eof, self._eof = self._eof, None
        if eof is None:
            return
        if eof.done():
            self.reusable = False  # it read a pipelined byte, or EOF: don't read on
        else:
            eof.cancel()
            await asyncio.wait([eof])  # the reader accepts one waiter: let the cancel land
        if not eof.cancelled():
            eof.exception()  # retrieved: no "exception never retrieved" noise

    async def write(self, data: bytes) -> None:
        if self.gone or self.writer.is_closing():
            raise _ClientGone
        self.writer.write(data)
        try:
            await self.writer.drain()
        except ConnectionError as exc:
            raise _ClientGone from exc

    async def respond(
        self, status: int, body: bytes = b"", headers: list[tuple[str, str]] | None = None, reason: str = "X"
    ) -> None:
        if status == 200 and self.fail_status:
            status = self.fail_status
        self.status_sent = status
        lines = [f"HTTP/1.1 {status} {reason}"]
        lines += [f"{name}: {value}" for name, value in [*(headers or []), *self.extra_headers]]
        if status >= 200 and status not in (204, 304):
            lines.append(f"Content-Length: {len(body)}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        await self.write(head if self.request.method == "HEAD" else head + body)

    async def json(self, value: Any, status: int = 200) -> None:
        await self.respond(status, json.dumps(value).encode(), [("Content-Type", "application/json")])


class MockUpstream:
    """The server: `start()` in the running loop, `stop()` when done; `stats` is live."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, pricing: Pricing | None = None) -> None:
        self.host = host
        self.port = port
        self.pricing = pricing or Pricing()
        self.stats = Stats()
        self._server: asyncio.AbstractServer | None = None
        self._release = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        self._release = asyncio.Event()
        self._server = await asyncio.start_server(self._connection, self.host, self.port, limit=256 * 1024)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> MockUpstream:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def reset(self) -> None:
        self.stats = Stats()

    def release(self) -> None:
        """Answer every `/hold` request now."""
        self._release.set()
        self._release = asyncio.Event()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.stats.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                exchange = _Exchange(reader, writer, _parse_head(head))
                if not await self._serve(exchange):
                    return
        except asyncio.CancelledError:
            pass
        finally:
            self._tasks.discard(task)
            self._writers.discard(writer)
            writer.close()

    async def _serve(self, exchange: _Exchange) -> bool:
        request = exchange.request
        if request.path.startswith("/_"):
            await exchange.body.consume()
            return await self._control(exchange)
        stats = self.stats.key(request.header(KEY_HEADER) or "-")
        stats.arrivals.append(time.monotonic())
        stats.arrivals_wall.append(time.time())
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        pricing = self.pricing
        cost, slots = pricing.price(request)
        index = len(stats.costs)
        stats.costs.append(cost)
        stats.slots.append(slots)
        stats.settled.append(cost)
        stats.slots_in_flight += slots
        stats.max_slots_in_flight = max(stats.max_slots_in_flight, stats.slots_in_flight)
        declared = request.query.get("declare", [])
        exchange.extra_headers = [(pricing.cost_header, value) for value in declared]
        exchange.fail_status = request.int_arg("fail", 0)
        try:
            if request.path == "/early_response":
                # Answer before reading the body (as an upstream refusing an upload does), then close.
                status = request.int_arg("status", 413)
                await exchange.respond(status, b'{"early": true}', [("Connection", "close")])
                stats.completed += 1
                return False
            try:
                await exchange.body.consume()
            finally:
                stats.last = {
                    "method": request.method,
                    "path": request.path,
                    "query": request.raw_query,
                    "headers": [list(pair) for pair in request.headers],
                    "body_length": exchange.body.length,
                    "body_complete": exchange.body.complete,
                }
                if not exchange.body.complete:
                    stats.incomplete_bodies += 1
            exchange.watch()
            keep = await self._behave(exchange)
            stats.completed += 1
        except _ClientGone:
            stats.disconnects += 1
            stats.disconnect_times.append(time.monotonic())
            keep = False
        finally:
            # Before any other await: a request that arrives once the answer is out must not
            # count this one as still in flight.
            stats.in_flight -= 1
            stats.slots_in_flight -= slots
            if exchange.status_sent:
                stats.settled[index] = pricing.settle(cost, declared, exchange.status_sent)
        await exchange.finish()
        return keep and exchange.reusable

    async def _control(self, exchange: _Exchange) -> bool:
        path = exchange.request.path
        if path == "/_stats":
            await exchange.json(self.stats.to_json())
        elif path == "/_reset":
            self.reset()
            await exchange.json({"reset": True})
        elif path == "/_release":
            self.release()
            await exchange.json({"released": True})
        elif path == "/_pricing":
            body = bytes(exchange.body.kept).decode() or "{}"
            self.pricing = Pricing.from_json(json.loads(body))
            await exchange.json({"rules": len(self.pricing.rules)})
        elif path == "/_jobs/finish":
            for job in self.stats.jobs.values():
                job.finished = True
            await exchange.json({"finished": len(self.stats.jobs)})
        else:
            await exchange.json({"error": "unknown control path"}, status=404)
        return exchange.reusable

    async def _behave(self, exchange: _Exchange) -> bool:
        """Answer one request; False closes the connection afterwards."""
        request = exchange.request
        path = request.path
        if path == "/hold":
            await exchange.wait(request.int_arg("ms", 30_000) / 1000, self._release)
            await exchange.json({"held": True})
        elif path == "/delay_headers":
            await exchange.wait(request.int_arg("ms", 0) / 1000)
            await exchange.json(_echo(exchange))
        elif path == "/download":
            await _download(exchange)
        elif path == "/upload":
            await exchange.json({"bytes": exchange.body.length, "sha256": exchange.body.digest.hexdigest()})
        elif path == "/abort_mid_body":
            await _abort_mid_body(exchange)
            return False
        elif path == "/gzip":
            await exchange.respond(
                200, GZIP_BODY, [("Content-Type", "application/json"), ("Content-Encoding", "gzip")]
            )
        elif path.startswith("/status/"):
            status = int(path.rsplit("/", 1)[1])
            body = b"" if status < 200 or status in (204, 304) else json.dumps({"status": status}).encode()
            await exchange.respond(status, body, [("Content-Type", "application/json")] if body else [])
        elif path == "/not_modified":  # a 304 saying the length a 200 would have had (RFC 9110 §8.6)
            await exchange.respond(304, b"", [("ETag", '"v1"'), ("Content-Length", "100")])
        elif path == "/invalid_headers":
            await exchange.write(_INVALID[request.arg("kind", "nocolon")])
            return False
        elif path == "/close_immediately":
            return False
        elif path == "/response_headers":
            await exchange.respond(200, b"ok", _HOP_RESPONSE_HEADERS)
        elif path == "/own_limit_headers":
            await exchange.respond(200, b"ok", OWN_LIMIT_HEADERS)
        elif path == "/extra_response":  # then, on the idle connection, an answer nobody asked for
            await exchange.respond(200, b'{"first": true}', [("Content-Type", "application/json")])
            await asyncio.sleep(request.int_arg("ms", 50) / 1000)
            if request.arg("kind", "poison") == "timeout":  # an idle timeout's 408, then the close
                await exchange.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                return False
            await exchange.write(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 18'
                                 b'\r\n\r\n{"poisoned": true}')
        elif path == "/jobs" or path.startswith("/jobs/"):
            await self._jobs(exchange)
        else:
            await exchange.json(_echo(exchange))
        return True


    async def _jobs(self, exchange: _Exchange) -> None:
        request = exchange.request
        key_id = request.header(KEY_HEADER) or "-"
        now = time.monotonic()
        jobs = self.stats.jobs
        if request.path == "/jobs" and request.method == "POST":
            await exchange.wait(request.int_arg("delay_ms", 0) / 1000)  # raises if the client leaves
            now = time.monotonic()
            status = request.int_arg("status", 201)
            if status >= 300:
                await exchange.json({"error": "refused"}, status=status)
                return
            job = MockJob(f"job-{len(jobs) + 1}-{random.getrandbits(32):08x}", key_id, now,
                          request.int_arg("ms", 30_000) / 1000)
            jobs[job.id] = job
            stats = self.stats.key(key_id)
            stats.jobs_created += 1
            stats.jobs_max_active = max(stats.jobs_max_active, self.stats.active_jobs(key_id))
            webhook = request.arg("webhook", "")
            if webhook:
                hook = webhook.replace("{id}", job.id)
                if request.arg("webhook_first", "0") == "1":
                    await _post(hook)
                else:
                    _spawn(self._tasks, self._call_when_done(job, hook))
            answer = {"status": job.status(now)} if request.arg("noid", "0") == "1" else {
                "id": job.id, "status": job.status(now)}
            # The job exists now, whoever is still there to hear of it (a real API's POST)
            await asyncio.sleep(request.int_arg("answer_ms", 0) / 1000)
            await exchange.json(answer, status=status)
            return
        job = jobs.get(request.path[len("/jobs/"):])
        if job is None or request.method not in ("GET", "DELETE"):
            await exchange.json({"error": "not_found"}, status=404)
            return
        if request.method == "DELETE" and job.active(now):
            job.cancelled = True
        await exchange.json({"id": job.id, "status": job.status(now)})

    async def _call_when_done(self, job: MockJob, url: str) -> None:
        while job.active(time.monotonic()):
            await asyncio.sleep(0.01)
        if not job.cancelled:
            await _post(url)


def _spawn(tasks: set[asyncio.Task[None]], coroutine: Any) -> None:
    task = asyncio.ensure_future(coroutine)
    tasks.add(task)
    task.add_done_callback(tasks.discard)


async def _post(url: str) -> None:
    """POST with an empty body (the upstream's `done` call to the gateway's admin port)."""
    rest = url.split("://", 1)[1]
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.rpartition(":")
    with contextlib.suppress(OSError):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(f"POST /{path} HTTP/1.1\r\nHost: {hostport}\r\nContent-Length: 0\r\n"
                     "Connection: close\r\n\r\n".encode())
        await writer.drain()
        await reader.read()
        writer.close()


def _echo(exchange: _Exchange) -> dict[str, Any]:
    request = exchange.request
    return {
        "method": request.method,
        "path": request.path,
        "target": request.target,
        "query": request.raw_query,
        "headers": [list(pair) for pair in request.headers],
        "body_length": exchange.body.length,
        "body_sha256": exchange.body.digest.hexdigest(),
        "body": bytes(exchange.body.kept).decode("latin-1"),
    }


async def _download(exchange: _Exchange) -> None:
    request = exchange.request
    total = request.int_arg("bytes", 1024)
    chunked = request.arg("mode", "length") == "chunked"
    pause = request.int_arg("ms", 0) / 1000
    framing = ("Transfer-Encoding", "chunked") if chunked else ("Content-Length", str(total))
    head = f"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n{framing[0]}: {framing[1]}\r\n\r\n"
    await exchange.write(head.encode())
    if request.method == "HEAD":
        return
    for block in download_blocks(total):
        await exchange.write(b"%x\r\n%b\r\n" % (len(block), block) if chunked else block)
        if pause:
            await exchange.wait(pause)
    if chunked:
        await exchange.write(b"0\r\n\r\n")


async def _abort_mid_body(exchange: _Exchange) -> None:
    request = exchange.request
    chunked = request.arg("mode", "length") == "chunked"
    framing = "Transfer-Encoding: chunked" if chunked else "Content-Length: 1000"
    half = b"x" * 500
    await exchange.write(f"HTTP/1.1 200 OK\r\n{framing}\r\n\r\n".encode())
    await exchange.write(b"1f4\r\n" + half + b"\r\n" if chunked else half)
    await asyncio.sleep(0.05)  # let the first half reach the client before the connection drops
    if request.arg("how", "close") == "reset":
        exchange.writer.transport.abort()
    else:
        exchange.writer.close()


_INVALID: dict[str, bytes] = {
    "ctl": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Bad: a\x01b\r\n\r\nok",
    "nul": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Bad: a\x00b\r\n\r\nok",
    "nocolon": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nThis line has no colon\r\n\r\nok",
    "space": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX Bad: value\r\n\r\nok",
    "huge": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Huge: " + b"a" * 100_000 + b"\r\n\r\nok",
    "status": b"HTTP/1.1 2OO OK\r\nContent-Length: 2\r\n\r\nok",
    # well-formed status lines, but no final answer a client can be sent
    "status600": b"HTTP/1.1 600 Beyond\r\nContent-Length: 2\r\n\r\nok",
    "status099": b"HTTP/1.1 099 Below\r\nContent-Length: 2\r\n\r\nok",
    "switching": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nraw",
}

OWN_LIMIT_HEADERS = [
    ("Concurrency-Limit", "25"), ("Concurrency-Remaining", "24"),
    ("X-Concurrent-Limit", "25"), ("X-Concurrent-Current", "1"), ("X-Concurrent-Remaining", "24"),
    ("X-RateLimit-Limit", "1000"), ("X-RateLimit-Remaining", "999"), ("X-RateLimit-Reset", "3600"),
    ("RateLimit", '"upstream";r=999;t=3600'), ("RateLimit-Policy", '"upstream";q=1000;w=3600'),
    ("X-Request-Cost", "7"), ("Retry-After", "3"), ("X-Upstream-Own", "kept"),
]

_HOP_RESPONSE_HEADERS = [
    ("Connection", "keep-alive, X-Upstream-Hop"),
    ("X-Upstream-Hop", "secret"),
    ("Keep-Alive", "timeout=5"),
    ("Proxy-Authenticate", "Basic"),
    ("Trailer", "X-Checksum"),
    ("Set-Cookie", "a=1; Path=/"),
    ("Set-Cookie", "b=2; Path=/"),
    ("X-Custom", "Mixed Case  value"),
    ("Content-Type", "text/plain"),
]


class ThreadedMockUpstream:
    """`MockUpstream` in a background thread with its own event loop."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, pricing: Pricing | None = None) -> None:
        self._host = host
        self._port = port
        self._pricing = pricing
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None
        self.upstream: MockUpstream | None = None

    @property
    def url(self) -> str:
        assert self.upstream is not None
        return self.upstream.url

    def _call(self, fn: Any) -> Any:
        assert self._loop is not None

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout=10)

    def snapshot(self) -> dict[str, Any]:
        """The counters, read inside the server's loop (a consistent copy)."""
        assert self.upstream is not None
        upstream = self.upstream
        return self._call(lambda: upstream.stats.to_json())  # type: ignore[no-any-return]

    def reset(self) -> None:
        assert self.upstream is not None
        upstream = self.upstream
        self._call(upstream.reset)

    def release(self) -> None:
        assert self.upstream is not None
        upstream = self.upstream
        self._call(upstream.release)

    def start(self) -> None:
        ready = threading.Event()

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stopped = asyncio.Event()
            self.upstream = MockUpstream(self._host, self._port, self._pricing)
            await self.upstream.start()
            ready.set()
            await self._stopped.wait()
            await self.upstream.stop()

        self._thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True, name="mock-upstream")
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("mock upstream did not start")

    def stop(self) -> None:
        if self._loop is not None and self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> ThreadedMockUpstream:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def _serve_forever(host: str, port: int, pricing: Pricing) -> None:
    upstream = MockUpstream(host, port, pricing)
    await upstream.start()
    print(f"listening on {upstream.host}:{upstream.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await upstream.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.mock_upstream", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--pricing", default="{}", help="the Pricing as JSON (see Pricing.from_json)")
    args = parser.parse_args(argv)
    asyncio.run(_serve_forever(args.host, args.port, Pricing.from_json(json.loads(args.pricing))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
