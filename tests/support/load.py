"""Closed-loop load for fault tests: a few clients sending requests back to back, every answer
(or client-side error) recorded with its start time and latency; plus metric scraping."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp
import httpx


@dataclass(frozen=True)
class Sample:
    started: float  # time.monotonic()
    latency: float
    status: int | None  # None: the client saw an error instead of a response
    error: str | None = None  # the `error` field of a gateway JSON answer, or the client error
    retry_after: str | None = None
    limited: bool = False  # the answer carried limit headers

    @property
    def ok(self) -> bool:
        return self.status is not None and self.status < 500


@dataclass
class Load:
    samples: list[Sample] = field(default_factory=list)

    def statuses(self) -> Counter[int | None]:
        return Counter(sample.status for sample in self.samples)

    def between(self, start: float, end: float) -> list[Sample]:
        return [s for s in self.samples if start <= s.started < end]

    def max_latency(self, samples: Sequence[Sample] | None = None) -> float:
        chosen = self.samples if samples is None else samples
        return max((s.latency for s in chosen), default=0.0)

    def percentile(self, q: float, samples: Sequence[Sample] | None = None) -> float:
        chosen = sorted(s.latency for s in (self.samples if samples is None else samples))
        return chosen[min(len(chosen) - 1, int(q * len(chosen)))] if chosen else 0.0


async def run_load(
    urls: Sequence[str],
    api_key: str,
    *,
    clients: int,
    duration: float,
    path: str = "/",
    timeout: float = 10.0,
    load: Load | None = None,
) -> Load:
    """`clients` concurrent loops, each sending one request after another for `duration` seconds,
    round-robin over `urls`."""
    load = load if load is not None else Load()
    deadline = time.monotonic() + duration
    connector = aiohttp.TCPConnector(limit=0)
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as session:

        async def one_client(n: int) -> None:
            i = n
            while time.monotonic() < deadline:
                url = urls[i % len(urls)] + path
                i += 1
                started = time.monotonic()
                try:
                    async with session.get(url, headers={"X-API-Key": api_key}) as response:
                        body = await response.read()
                        error = None
                        if response.content_type == "application/json" and b'"success":false' in body:
                            error = (await response.json())["error"]
                        headers = response.headers
                        limited = "x-ratelimit-limit" in headers or "concurrency-limit" in headers
                        load.samples.append(Sample(
                            started, time.monotonic() - started, response.status, error,
                            headers.get("retry-after"), limited,
                        ))
                except (TimeoutError, aiohttp.ClientError) as exc:
                    load.samples.append(Sample(started, time.monotonic() - started, None, repr(exc)))

        await asyncio.gather(*(one_client(n) for n in range(clients)))
    return load


def metric(admin_url: str, name: str, **labels: str) -> float:
    """The sum of every sample of `name` whose labels include `labels`."""
    total = 0.0
    for line in httpx.get(admin_url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total
