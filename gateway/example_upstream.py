"""A tiny example "scraping API" to put behind the gateway (demo, docs, compose file).

    python -m gateway.example_upstream --listen 127.0.0.1:9000

Endpoints (all JSON):
- `GET|POST /v1/scrape?url=...&delay_ms=N`: a fake page for `url` after `delay_ms` milliseconds
- `POST /v1/read?url=...`: the same page as markdown-ish text, at once
- `POST /v1/crawl?url=...&duration_ms=N`: starts an async job, answers `{"id": ..., "status": "queued"}`;
  the job runs and completes `duration_ms` (default 3000) later
- `GET /v1/crawl/{id}`: the job's status (`queued`, `running`, `completed`, `cancelled`)
- `DELETE /v1/crawl/{id}`: cancels the job
- `GET /healthz`

Parameters may also come as a JSON body. Every answer says which key id and plan the gateway
passed (`X-Gateway-Key-Id`, `X-Gateway-Plan`), to make the demo visible.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

QUEUED_SECONDS = 0.5  # a new job shows "queued" this long, then "running"
DEFAULT_CRAWL_MS = 3000
MAX_DELAY_MS = 60_000
_FORGET_AFTER = 3600.0  # finished jobs are kept this long for status calls


@dataclass
class Job:
    id: str
    url: str
    created: float
    duration: float
    cancelled: bool = False

    def status(self, now: float) -> str:
        if self.cancelled:
            return "cancelled"
        age = now - self.created
        if age < min(QUEUED_SECONDS, self.duration):
            return "queued"
        return "running" if age < self.duration else "completed"

    def to_json(self, now: float) -> dict[str, Any]:
        status = self.status(now)
        answer: dict[str, Any] = {"id": self.id, "url": self.url, "status": status}
        if status == "completed":
            answer["pages"] = 3
        return answer


JOBS = web.AppKey("jobs", dict[str, Job])


async def _params(request: web.Request) -> dict[str, str]:
    """Query parameters, overlaid by a JSON object body if there is one."""
    params = dict(request.query)
    if request.can_read_body:
        with contextlib.suppress(ValueError):
            body = await request.json()
            if isinstance(body, dict):
                params.update({str(k): str(v) for k, v in body.items()})
    return params


def _int(params: dict[str, str], name: str, default: int, ceiling: int) -> int:
    try:
        return max(0, min(int(params.get(name, default)), ceiling))
    except ValueError:
        raise web.HTTPBadRequest(
            text=f'{{"success": false, "error": "{name} must be an integer"}}',
            content_type="application/json",
        ) from None


def _caller(request: web.Request) -> dict[str, str | None]:
    return {"key_id": request.headers.get("X-Gateway-Key-Id"), "plan": request.headers.get("X-Gateway-Plan")}


def _page(url: str) -> str:
    return f"<html><head><title>{url}</title></head><body><h1>Example page for {url}</h1></body></html>"


async def scrape(request: web.Request) -> web.Response:
    params = await _params(request)
    url = params.get("url", "https://example.com/")
    delay_ms = _int(params, "delay_ms", 0, MAX_DELAY_MS)
    await asyncio.sleep(delay_ms / 1000)
    return web.json_response(
        {"success": True, "url": url, "status_code": 200, "content": _page(url), "delay_ms": delay_ms}
        | {"caller": _caller(request)}
    )


async def read(request: web.Request) -> web.Response:
    params = await _params(request)
    url = params.get("url", "https://example.com/")
    return web.json_response(
        {"success": True, "url": url, "markdown": f"# Example page for {url}\n", "caller": _caller(request)}
    )


async def start_crawl(request: web.Request) -> web.Response:
    params = await _params(request)
    jobs = request.app[JOBS]
    now = time.monotonic()
    _forget_old(jobs, now)
    duration_ms = _int(params, "duration_ms", DEFAULT_CRAWL_MS, 24 * 3600 * 1000)
    job = Job(secrets.token_hex(8), params.get("url", "https://example.com/"), now, duration_ms / 1000)
    jobs[job.id] = job
    return web.json_response(job.to_json(now) | {"caller": _caller(request)}, status=201)


def _job(request: web.Request) -> Job:
    job = request.app[JOBS].get(request.match_info["id"])
    if job is None:
        raise web.HTTPNotFound(
            text='{"success": false, "error": "not_found"}', content_type="application/json"
        )
    return job


async def crawl_status(request: web.Request) -> web.Response:
    return web.json_response(_job(request).to_json(time.monotonic()))


async def cancel_crawl(request: web.Request) -> web.Response:
    job = _job(request)
    if job.status(time.monotonic()) in ("queued", "running"):
        job.cancelled = True
    return web.json_response(job.to_json(time.monotonic()))


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


def _forget_old(jobs: dict[str, Job], now: float) -> None:
    for job_id in [j.id for j in jobs.values() if now - j.created - j.duration > _FORGET_AFTER]:
        del jobs[job_id]


def build_app() -> web.Application:
    app = web.Application()
    app[JOBS] = {}
    app.router.add_route("GET", "/v1/scrape", scrape)
    app.router.add_route("POST", "/v1/scrape", scrape)
    app.router.add_route("POST", "/v1/read", read)
    app.router.add_route("POST", "/v1/crawl", start_crawl)
    app.router.add_route("GET", "/v1/crawl/{id}", crawl_status)
    app.router.add_route("DELETE", "/v1/crawl/{id}", cancel_crawl)
    app.router.add_route("GET", "/healthz", healthz)
    return app


async def serve_example_upstream(host: str, port: int, *, ready: Callable[[int], None] | None = None) -> None:
    """Serve until cancelled; `ready` gets the bound port (useful with port 0)."""
    runner = web.AppRunner(build_app(), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0][1]
        if ready is not None:
            ready(int(bound))
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def _split_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {listen!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gateway example-upstream", description="A tiny example scraping API."
    )
    parser.add_argument("--listen", default="127.0.0.1:9000", type=_split_listen, help="HOST:PORT")
    args = parser.parse_args(argv)
    host, port = args.listen

    def announce(bound: int) -> None:
        print(f"example upstream listening on http://{host}:{bound}", flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_example_upstream(host, port, ready=announce))
    return 0


if __name__ == "__main__":
    sys.exit(main())
