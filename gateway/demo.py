"""`gateway demo`: a newcomer's first five minutes, on one machine, with nothing to install.

It starts the example scraping API and the gateway (memory store, the config below) in this
process on free loopback ports, runs a short scripted load, prints what happens as it goes
(admissions, 429s by kind with their headers, a ban), and ends by itself.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Mapping

import aiohttp

from gateway.app import GatewayApp
from gateway.config.loader import load_config_text
from gateway.example_upstream import serve_example_upstream
from gateway.server import SignalFreeServer, bind, uvicorn_config
from gateway.state import GatewayState

DEMO_CONFIG = """
listen: 127.0.0.1:{gateway_port}
admin_listen: 127.0.0.1:{admin_port}
upstream:
  url: http://127.0.0.1:{upstream_port}
store:
  url: memory://
keys:
  - {{id: demo-free, key: demo-free-key, plan: free}}
  - {{id: demo-pro, key: demo-pro-key, plan: pro}}
plans:
  free:
    limits:
      rpm: {{rate: 5/1m}}
      requests: {{concurrency: 2}}
  pro:
    limits:
      rpm: {{rate: 100/1m}}
      requests: {{concurrency: 3}}
routes:
  - path: /v1/**
    limits: [rpm, requests]
bans:
  strikes: 6
  within: 1m
  duration: 30s
"""

SHOWN_HEADERS = ("concurrency-remaining", "x-ratelimit-remaining", "retry-after")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _headers(headers: Mapping[str, str]) -> str:
    shown = [f"{name.title()}: {headers[name]}" for name in SHOWN_HEADERS if name in headers]
    return "  ".join(shown)


class Demo:
    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self.upstream_port, self.gateway_port = _free_port(), _free_port()
        text = DEMO_CONFIG.format(gateway_port=self.gateway_port, admin_port=_free_port(),
                                  upstream_port=self.upstream_port)
        self.config = load_config_text(text, "<demo>")
        self.base = f"http://127.0.0.1:{self.gateway_port}"

    async def run(self) -> None:
        ready = asyncio.get_running_loop().create_future()
        upstream = asyncio.create_task(serve_example_upstream("127.0.0.1", self.upstream_port,
                                                              ready=ready.set_result))
        await ready
        state = GatewayState.create(self.config)
        await state.open()
        server = SignalFreeServer(uvicorn_config(GatewayApp(state), self.config, public=True))
        serving = asyncio.create_task(server.serve([bind(self.config.listen)]))
        while not server.started:
            await asyncio.sleep(0.01)
        self.say(f"example upstream on 127.0.0.1:{self.upstream_port}, gateway on {self.base} (memory store)\n")
        try:
            async with aiohttp.ClientSession() as session:
                await self.script(session)
            self.say("\nrequests by outcome (gateway_requests_total):")
            state.metrics.flush()  # the last requests' updates wait for the end of a loop iteration
            for metric in state.metrics.requests.collect():
                for sample in metric.samples:
                    if sample.name.endswith("_total"):
                        labels = sample.labels
                        self.say(f"  {labels['outcome']:<20} plan={labels['plan']:<5} {int(sample.value)}")
        finally:
            server.should_exit = True
            await serving
            await state.aclose()
            upstream.cancel()

    async def get(self, session: aiohttp.ClientSession, key: str, delay_ms: int = 0) -> tuple[int, str, str]:
        url = f"{self.base}/v1/scrape?url=https://example.com&delay_ms={delay_ms}"
        async with session.get(url, headers={"X-API-Key": key}) as response:
            body = await response.json(content_type=None)
            error = body.get("error", "") if isinstance(body, dict) else ""
            return response.status, error, _headers(response.headers)

    async def script(self, session: aiohttp.ClientSession) -> None:
        say = self.say
        say("1. The free plan allows 5 requests per sliding minute. Seven in a row:")
        for i in range(1, 8):
            status, error, headers = await self.get(session, "demo-free-key")
            say(f"   #{i} → {status} {error or 'ok':<20} {headers}")

        say("\n2. The pro plan has 3 concurrency slots. Five slow (1 s) requests at once:")
        results = await asyncio.gather(*(self.get(session, "demo-pro-key", delay_ms=1000) for _ in range(5)))
        for i, (status, error, headers) in enumerate(sorted(results), 1):
            say(f"   #{i} → {status} {error or 'ok':<20} {headers}")
        say("   (the 429s carry Retry-After: 1: a slot can free any moment)")

        say("\n3. A client hammering with a wrong key. Every 401 is a strike against the client IP (a 429 is")
        say("   one only when it comes back before its wait); 6 within a minute ban the IP, whatever key it sends:")
        for i in range(1, 9):
            status, error, headers = await self.get(session, "not-a-key")
            say(f"   #{i} → {status} {error:<20} {headers}")
        status, error, headers = await self.get(session, "demo-pro-key")
        say(f"   even with a valid key now → {status} {error} {headers}")


def main() -> int:
    asyncio.run(Demo(print).run())
    return 0
