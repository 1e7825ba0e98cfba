"""In-process micro benchmark of the gateway's hot path: CPU per request, no sockets.

Drives `GatewayApp` (memory store, the bench's plans, the access log to /dev/null) and the
bare proxy's path (`bench/bare_proxy.py`'s `BareProxy`) with fake ASGI `receive`/`send` and a
stub upstream client that answers at once, then prints CPU µs per request of each and the
difference: what admission, limit headers, metrics and the access log add. Quick to run
(a few seconds), so it suits iterating on the hot path; `bench/run` is the real measurement.

    .venv/bin/python bench/micro_app.py [--requests N] [--rounds R] [--store redis://127.0.0.1:6379/15]

With `--store` the gateway decides on that store instead (requests one at a time: each waits
for its own round trip, so this is the CPU of an unbatched admission and release).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.bare_proxy import BareProxy  # noqa: E402
from gateway.accesslog import AccessLog  # noqa: E402
from gateway.app import GatewayApp  # noqa: E402
from gateway.asgi import Message, Receive, Scope, Send  # noqa: E402
from gateway.config.loader import load_config_text  # noqa: E402
from gateway.disconnects import EXTENSION, DisconnectWatch  # noqa: E402
from gateway.proxy.upstream import Body, Headers  # noqa: E402
from gateway.state import GatewayState  # noqa: E402

CONFIG = """
listen: 127.0.0.1:18080
admin_listen: 127.0.0.1:18081
upstream: {url: "http://127.0.0.1:9", client: aiohttp}
store: {url: "STORE_URL"}
keys:
  - {id: bench, key: bench-key-000000, plan: bench}
  - {id: over, key: over-limit-key, plan: tiny}
plans:
  bench: {limits: {rate: {rate: 1000000/10s}, inflight: {concurrency: 100000}}}
  tiny: {limits: {rate: {rate: 1/1h}}}
routes:
  - {path: /v1/**, limits: [rate, inflight]}
"""

_RESPONSE_HEADERS = [(b"Content-Type", b"application/json"), (b"Content-Length", b"1024"), (b"Server", b"nginx")]
_BODY = b"x" * 1024


class StubResponse:
    status = 200
    headers = _RESPONSE_HEADERS

    async def chunks(self) -> AsyncIterator[bytes]:
        yield _BODY

    async def aclose(self) -> None:
        pass


class StubUpstream:
    """Answers every request at once with a 1 KiB JSON body."""

    async def send(self, method: str, url: str, headers: Headers, body: Body, content_length: int | None) -> Any:
        return StubResponse()

    async def aclose(self) -> None:
        pass


def scope_for(key: bytes) -> Scope:
    return {
        "type": "http", "method": "GET", "path": "/v1/bench", "raw_path": b"/v1/bench", "query_string": b"",
        "scheme": "http", "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 18080),
        "headers": [(b"host", b"127.0.0.1:18080"), (b"user-agent", b"wrk"), (b"accept", b"*/*"),
                    (b"x-api-key", key)],
        "extensions": {EXTENSION: DisconnectWatch()},  # as the gateway's server protocol offers it
    }


async def _receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _send(message: Message) -> None:
    pass


async def run(app: Any, scope: Scope, count: int) -> float:
    """CPU µs per request for `count` sequential requests."""
    receive: Receive = _receive
    send: Send = _send
    started = time.process_time()
    for _ in range(count):
        await app(dict(scope), receive, send)
        if _ % 64 == 0:
            await asyncio.sleep(0)  # let per-iteration callbacks (log flushes) run as they would
    return (time.process_time() - started) / count * 1e6


async def main(count: int, rounds: int, store: str) -> None:
    config = load_config_text(CONFIG.replace("STORE_URL", store))
    state = GatewayState.create(config, upstream=StubUpstream())
    await state.open()
    log = AccessLog(open(os.devnull, "w"))  # noqa: SIM115 (kept for the whole run)
    gateway = GatewayApp(state, log)
    bare = BareProxy(config.upstream)
    bare.client = StubUpstream()
    cases = {
        "bare": (bare, scope_for(b"bench-key-000000")),
        "gateway admitted": (gateway, scope_for(b"bench-key-000000")),
        "gateway 429 (rate)": (gateway, scope_for(b"over-limit-key")),
    }
    best: dict[str, float] = {}
    for _ in range(rounds):
        for name, (app, scope) in cases.items():
            us = await run(app, scope, count)
            best[name] = min(best.get(name, us), us)
    for name, us in best.items():
        print(f"{name:20s} {us:7.1f} µs/request")
    print(f"{'gateway − bare':20s} {best['gateway admitted'] - best['bare']:7.1f} µs/request")
    await state.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--store", default="memory://", help="the gateway's store URL (default memory://)")
    args = parser.parse_args()
    import uvloop

    uvloop.run(main(args.requests, args.rounds, args.store))
