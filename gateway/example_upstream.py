"""A tiny example "scraping API" to put behind the gateway (quickstart, demo, docs, compose file).

    gateway example-upstream --listen 127.0.0.1:9000 --delay 500ms

It answers the request shapes of the scraping APIs the `config/*-style.yaml` profiles imitate,
so their SDKs and examples work against it unchanged. Every page-fetching call takes `--delay`
(default 500ms, so that concurrency limits can be seen by hand) unless it says `delay_ms=N`:

- ZenRows-style: `GET|POST /v1/?url=...`: the page itself, as HTML
- `GET|POST /v1/scrape?url=...`: `{"success": true, "url", "content": <html>, ...}` (JSON)
- ZapFetch-style: `POST /v1/search` (`query`), `/v1/map` (`url`), `/v1/extract` (`url`): JSON
- Reader-style: `POST /v1/read?url=...` (markdown-ish text in JSON), `POST /v1/batch` (`urls`, one
  async job for all of them), job status at `GET /v1/jobs/{id}`, cancel with `DELETE`
- cloro-style: `POST /v1/monitor/{engine}` (`prompt`): JSON; `POST /v1/async/{anything}`:
  202 `{"id", "status": "queued"}` (results would come by webhook; none are sent)
- `POST /v1/crawl?url=...&duration_ms=N`: starts an async job, answers `{"id": ..., "status": "queued"}`;
  the job runs and completes `duration_ms` (default 3000) later. `GET /v1/crawl/{id}` (or
  `/v1/jobs/{id}`) reports it (`queued`, `running`, `completed`, `cancelled`), `DELETE` cancels it
- `GET /healthz`

Parameters may also come as a JSON body. Every JSON answer says which key id and plan the
gateway passed (`X-Gateway-Key-Id`, `X-Gateway-Plan`), to make the demo visible. When its port is
taken it exits with status 1 and one line saying so (scripts/quickstart then stops too).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from gateway.config.units import parse_duration

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
DELAY_MS = web.AppKey("delay_ms", int)  # the default delay of page-fetching calls
DEFAULT_DELAY = "500ms"


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


async def _fetch(request: web.Request) -> tuple[dict[str, str], int]:
    """The call's parameters, after the page-fetching delay (its `delay_ms`, else `--delay`)."""
    params = await _params(request)
    delay_ms = _int(params, "delay_ms", request.app[DELAY_MS], MAX_DELAY_MS)
    await asyncio.sleep(delay_ms / 1000)
    return params, delay_ms


async def page(request: web.Request) -> web.Response:
    """ZenRows-style: the page itself, not wrapped in JSON."""
    params, _ = await _fetch(request)
    return web.Response(text=_page(params.get("url", "https://example.com/")), content_type="text/html")


async def scrape(request: web.Request) -> web.Response:
    params, delay_ms = await _fetch(request)
    url = params.get("url", "https://example.com/")
    return web.json_response(
        {"success": True, "url": url, "status_code": 200, "content": _page(url), "delay_ms": delay_ms}
        | {"caller": _caller(request)}
    )


async def read(request: web.Request) -> web.Response:
    params, _ = await _fetch(request)
    url = params.get("url", "https://example.com/")
    return web.json_response(
        {"success": True, "url": url, "markdown": f"# Example page for {url}\n", "caller": _caller(request)}
    )


async def search(request: web.Request) -> web.Response:
    params, _ = await _fetch(request)
    query = params.get("query", "")
    results = [{"url": f"https://example.com/{n}", "title": f"Result {n} for {query}"} for n in (1, 2, 3)]
    return web.json_response({"success": True, "query": query, "data": results, "caller": _caller(request)})


async def map_site(request: web.Request) -> web.Response:
    params, _ = await _fetch(request)
    url = params.get("url", "https://example.com").rstrip("/")
    links = [url + path for path in ("/", "/about", "/pricing")]
    return web.json_response({"success": True, "links": links, "caller": _caller(request)})


async def extract(request: web.Request) -> web.Response:
    params, _ = await _fetch(request)
    url = params.get("url", "https://example.com/")
    return web.json_response({"success": True, "data": {"url": url, "title": f"Example page for {url}"},
                              "caller": _caller(request)})


async def monitor(request: web.Request) -> web.Response:
    params, _ = await _fetch(request)
    engine = request.match_info["engine"]
    return web.json_response({"success": True, "engine": engine, "prompt": params.get("prompt", ""),
                              "answer": f"An example answer from {engine}.", "caller": _caller(request)})


async def submit_async(request: web.Request) -> web.Response:
    """cloro-style async task: accepted at once; its result would be delivered by webhook."""
    return web.json_response({"id": secrets.token_hex(8), "status": "queued", "caller": _caller(request)},
                             status=202)


def _new_job(request: web.Request, params: dict[str, str], url: str) -> web.Response:
    jobs = request.app[JOBS]
    now = time.monotonic()
    _forget_old(jobs, now)
    duration_ms = _int(params, "duration_ms", DEFAULT_CRAWL_MS, 24 * 3600 * 1000)
    job = Job(secrets.token_hex(8), url, now, duration_ms / 1000)
    jobs[job.id] = job
    return web.json_response(job.to_json(now) | {"caller": _caller(request)}, status=201)


async def start_crawl(request: web.Request) -> web.Response:
    params = await _params(request)
    return _new_job(request, params, params.get("url", "https://example.com/"))


async def start_batch(request: web.Request) -> web.Response:
    """Reader-style: many URLs, one request, one job (`urls` as a JSON list or comma-separated)."""
    params = dict(request.query)
    urls: list[str] = []
    if request.can_read_body:
        with contextlib.suppress(ValueError):
            body = await request.json()
            if isinstance(body, dict):
                params.update({str(k): str(v) for k, v in body.items() if k != "urls"})
                if isinstance(body.get("urls"), list):
                    urls = [str(url) for url in body["urls"]]
    urls = urls or [url for url in params.get("urls", "").split(",") if url]
    return _new_job(request, params, f"{len(urls)} URLs")


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


def build_app(delay_ms: int = 0) -> web.Application:
    app = web.Application()
    app[JOBS] = {}
    app[DELAY_MS] = delay_ms
    for method in ("GET", "POST"):
        app.router.add_route(method, "/v1/", page)
        app.router.add_route(method, "/v1", page)
        app.router.add_route(method, "/v1/scrape", scrape)
    for path, handler in (("/v1/read", read), ("/v1/search", search), ("/v1/map", map_site),
                          ("/v1/extract", extract), ("/v1/monitor/{engine}", monitor),
                          ("/v1/async/{task:.+}", submit_async), ("/v1/crawl", start_crawl),
                          ("/v1/batch", start_batch)):
        app.router.add_route("POST", path, handler)
    for jobs_path in ("/v1/crawl/{id}", "/v1/jobs/{id}"):
        app.router.add_route("GET", jobs_path, crawl_status)
        app.router.add_route("DELETE", jobs_path, cancel_crawl)
    app.router.add_route("GET", "/healthz", healthz)
    return app


async def serve_example_upstream(
    host: str, port: int, *, ready: Callable[[int], None] | None = None, delay_ms: int = 0
) -> None:
    """Serve until cancelled; `ready` gets the bound port (useful with port 0). Raises OSError
    when the address cannot be bound."""
    runner = web.AppRunner(build_app(delay_ms), access_log=None)
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
    parser.add_argument("--delay", default=DEFAULT_DELAY, type=_delay_ms,
                        help=f"how long each page-fetching call takes unless it says delay_ms "
                             f"(default {DEFAULT_DELAY})")
    args = parser.parse_args(argv)
    host, port = args.listen

    def announce(bound: int) -> None:
        print(f"example upstream listening on http://{host}:{bound}", flush=True)

    try:
        asyncio.run(_serve_until_signalled(host, port, announce, args.delay))
    except OSError as exc:  # the port is taken (or the address is not ours): one line, no traceback
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        print(f"gateway example-upstream: cannot listen on {host}:{port}: {reason}", file=sys.stderr)
        return 1
    return 0


async def _serve_until_signalled(host: str, port: int, announce: Callable[[int], None], delay_ms: int) -> None:
    """Serve until SIGINT or SIGTERM (set here: a shell starts background jobs with SIGINT ignored)."""
    server = asyncio.ensure_future(serve_example_upstream(host, port, ready=announce, delay_ms=delay_ms))
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, server.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await server


def _delay_ms(text: str) -> int:
    try:
        seconds = parse_duration(text, allow_zero=True)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not 0 <= seconds * 1000 <= MAX_DELAY_MS:
        raise argparse.ArgumentTypeError(f"must be between 0 and {MAX_DELAY_MS // 1000}s")
    return round(seconds * 1000)


if __name__ == "__main__":
    sys.exit(main())
