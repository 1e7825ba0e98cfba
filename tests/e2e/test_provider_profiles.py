"""The four provider-profile example configs (config/*-style.yaml, notes/PROVIDERS.md), each run
as it ships by a real `gateway serve` on the shared test Redis, and shown doing what its
provider documents with real requests. Only the upstream and store URLs change, through the
`${UPSTREAM_URL:-...}` / `${GATEWAY_STORE_URL:-...}` interpolation the files already use; the
listen ports come from the harness's --listen flags. The API keys are the demo keys written in
each file's comments."""

from __future__ import annotations

import asyncio
import itertools
import math
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from gateway.admission.bans import FIRST_BURST
from tests.support.processes import ROOT, Proc, _wait_http, gateway, mock_upstream
from tests.support.redis_server import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

CONFIG = ROOT / "config"


@pytest.fixture
def profile(tmp_path: Path) -> Callable[[str], Path]:
    """The shipped config file itself, linked from tmp_path so that the harness writes the
    gateway's log there rather than next to the config in the repository."""

    def linked(name: str) -> Path:
        link = tmp_path / name
        link.symlink_to(CONFIG / name)
        return link

    return linked


# -- helpers -------------------------------------------------------------------------------------


def wait_until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def call(client: httpx.Client, gw: Proc, method: str, path: str, key: str, **kwargs: Any) -> httpx.Response:
    return client.request(method, gw.url + path, headers={"X-API-Key": key}, **kwargs)


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30, limits=httpx.Limits(max_connections=100)) as shared:
        yield shared


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=16) as executor:
        yield executor


class ProfileUpstream:
    """A small API for the profiles neither the mock nor the example upstream can play
    (cloro's monitor endpoints that take a while, Reader's `/v1/jobs/{id}`), in a thread:
    - `POST /v1/batch`, `POST /v1/crawl`: start a job, 201 `{"id", "status": "queued"}`
    - `GET /v1/jobs/{id}`: `{"id", "status"}`; `DELETE /v1/jobs/{id}`: cancel it
    - anything else: 200 `{"path"}`, after `POST /_release` when the query has `hold=1`
    - `POST /_finish`: every job is completed; `GET /_stats`: `{"in_flight", "jobs_created"}`."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.jobs: dict[str, str] = {}
        self.in_flight = 0
        self._ids = itertools.count(1)
        self._loop = asyncio.new_event_loop()
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="profile-upstream")

    async def _handle(self, request: web.Request) -> web.Response:
        path, method = request.path, request.method
        if path == "/_stats":
            return web.json_response({"in_flight": self.in_flight, "jobs_created": len(self.jobs)})
        if path == "/_release":
            self._release.set()
            return web.json_response({"released": True})
        if path == "/_finish":
            for job_id, status in self.jobs.items():
                if status == "queued":
                    self.jobs[job_id] = "completed"
            return web.json_response({"finished": True})
        if method == "POST" and path in ("/v1/batch", "/v1/crawl"):
            job_id = f"job-{next(self._ids)}"
            self.jobs[job_id] = "queued"
            return web.json_response({"id": job_id, "status": "queued"}, status=201)
        if path.startswith("/v1/jobs/"):
            job_id = path.rsplit("/", 1)[1]
            if job_id not in self.jobs:
                return web.json_response({"error": "not_found"}, status=404)
            if method == "DELETE" and self.jobs[job_id] == "queued":
                self.jobs[job_id] = "cancelled"
            return web.json_response({"id": job_id, "status": self.jobs[job_id]})
        self.in_flight += 1
        try:
            if request.query.get("hold") == "1":
                await asyncio.wait_for(self._release.wait(), 20)
            return web.json_response({"path": path})
        finally:
            self.in_flight -= 1

    def hold_again(self) -> None:
        """After a `/_release`: make `hold=1` requests wait again."""

        async def clear() -> None:
            self._release.clear()

        asyncio.run_coroutine_threadsafe(clear(), self._loop).result(10)

    def stats(self) -> dict[str, Any]:
        return httpx.get(self.url + "/_stats").json()  # type: ignore[no-any-return]

    def __enter__(self) -> ProfileUpstream:
        async def start() -> None:
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", self._handle)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

        self._thread.start()
        asyncio.run_coroutine_threadsafe(start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            self._release.set()
            if self._runner is not None:
                await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def release_holds(upstream: str) -> None:
    httpx.post(upstream + "/_release")


def mock_in_flight(upstream: str, key_id: str) -> int:
    keys = httpx.get(upstream + "/_stats").json()["keys"]
    return int(keys.get(key_id, {}).get("in_flight", 0))


# -- zenrows-style: concurrency slots only ---------------------------------------------------------

ZENROWS_TRIAL, ZENROWS_DEVELOPER = "zenrows-trial-demo-key", "zenrows-developer-demo-key"


@pytest.fixture
def zenrows(redis_url: str, profile: Callable[[str], Path]) -> Iterator[tuple[Proc, str]]:
    with mock_upstream() as upstream, gateway(
        profile("zenrows-style.yaml"), env={"UPSTREAM_URL": upstream, "GATEWAY_STORE_URL": redis_url}
    ) as gw:
        try:
            yield gw, upstream
        finally:
            release_holds(upstream)


def test_zenrows_headers_count_the_slots_in_flight(
    zenrows: tuple[Proc, str], client: httpx.Client, pool: ThreadPoolExecutor
) -> None:
    gw, upstream = zenrows
    held: list[Future[httpx.Response]] = []
    for count in (1, 2, 3):  # one at a time, so each one's arrival order is known
        held.append(pool.submit(call, client, gw, "GET", "/hold", ZENROWS_DEVELOPER, params={"ms": 20_000}))
        wait_until(lambda count=count: mock_in_flight(upstream, "developer-user") == count)
    fourth = call(client, gw, "GET", "/anything", ZENROWS_DEVELOPER)
    assert fourth.status_code == 200
    assert (fourth.headers["concurrency-limit"], fourth.headers["concurrency-remaining"]) == ("10", "6")
    assert not any(name.startswith(("x-ratelimit", "x-concurrent", "ratelimit")) for name in fourth.headers)
    release_holds(upstream)
    answers = [future.result(10) for future in held]
    assert [a.status_code for a in answers] == [200, 200, 200]
    # 10 slots, 3 in flight (the third itself counted) → 7.
    assert [a.headers["concurrency-remaining"] for a in answers] == ["9", "8", "7"]
    assert call(client, gw, "GET", "/anything", ZENROWS_DEVELOPER).headers["concurrency-remaining"] == "9"


def test_zenrows_n_plus_first_is_refused_at_once_and_a_hammering_ip_gets_banned(
    zenrows: tuple[Proc, str], client: httpx.Client, pool: ThreadPoolExecutor
) -> None:
    gw, upstream = zenrows
    hold = {"ms": 20_000}
    held = [pool.submit(call, client, gw, "GET", "/hold", ZENROWS_TRIAL, params=hold) for _ in range(5)]
    wait_until(lambda: mock_in_flight(upstream, "trial-user") == 5)

    started = time.monotonic()
    refused = call(client, gw, "GET", "/anything", ZENROWS_TRIAL)
    assert time.monotonic() - started < 1.0  # not queued
    assert refused.status_code == 429 and refused.json()["error"] == "concurrency_limited"
    assert refused.headers["retry-after"] == "1" and refused.json()["retryAfterSeconds"] == 1
    assert (refused.headers["concurrency-limit"], refused.headers["concurrency-remaining"]) == ("5", "0")
    # Another key's slots are its own.
    assert call(client, gw, "GET", "/anything", ZENROWS_DEVELOPER).status_code == 200

    # bans: 30 strikes within a minute → the IP is blocked for 5 minutes. A client retrying
    # a concurrency 429 at once comes back before its told wait: past the 16 refusals the
    # tolerance forgives (16 threads could each have been told once), each one is a strike.
    hammer_until_banned(client, gw, strikes_needed=30)
    banned = call(client, gw, "GET", "/anything", ZENROWS_DEVELOPER)  # the IP, whatever the key
    assert banned.status_code == 403 and banned.json()["error"] == "ip_banned"
    assert 290 <= int(banned.headers["retry-after"]) <= 300
    assert banned.json()["retryAfterSeconds"] == int(banned.headers["retry-after"])
    [ban] = httpx.get(gw.admin_url + "/v1/bans").json()
    assert (ban["ip"], ban["ban_count"]) == ("127.0.0.1", 1)

    # An operator's lift is a pardon (strikes and past bans forgotten): the IP is let in, and it
    # takes 30 fresh strikes to be banned again, for the first duration. (The ×3 escalation of a
    # ban that simply ran out needs the 5 minutes to pass: tests/store covers it.)
    assert httpx.delete(gw.admin_url + "/v1/bans/127.0.0.1").status_code == 200
    assert call(client, gw, "GET", "/anything", ZENROWS_DEVELOPER).status_code == 200
    hammer_until_banned(client, gw, strikes_needed=30)
    again = call(client, gw, "GET", "/anything", ZENROWS_DEVELOPER)
    assert again.status_code == 403 and 290 <= int(again.headers["retry-after"]) <= 300

    release_holds(upstream)
    assert [future.result(10).status_code for future in held] == [200] * 5  # admitted before the ban
    assert mock_in_flight(upstream, "trial-user") == 0


def concurrency_strikes(gw: Proc) -> float:
    text = httpx.get(gw.admin_url + "/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith('gateway_ban_strikes_total{kind="concurrency"}'))


def hammer_until_banned(client: httpx.Client, gw: Proc, strikes_needed: int) -> None:
    """Over-limit requests at once, one after another (the trial key's 5 slots are held)
    until the ban: the 403s start right after the 429 that was the `strikes_needed`-th strike
    (the request after it waits for the store's verdict), and at most `tolerance` (16) of the
    429s before were forgiven."""
    before = concurrency_strikes(gw)
    # The first half second of a streak of refusals is a first burst, never early (FIRST_BURST).
    first = call(client, gw, "GET", "/anything", ZENROWS_TRIAL)
    assert first.status_code == 429
    time.sleep(FIRST_BURST)
    statuses = [call(client, gw, "GET", "/anything", ZENROWS_TRIAL).status_code for _ in range(80)]
    assert 403 in statuses, statuses
    refusals = statuses.index(403)
    assert set(statuses[:refusals]) == {429} and set(statuses[refusals:]) == {403}
    assert concurrency_strikes(gw) - before == strikes_needed
    assert strikes_needed <= refusals <= strikes_needed + 16, statuses


# -- cloro-style: per-endpoint rate buckets, concurrency on monitors ------------------------------

CLORO_TRIAL, CLORO_PRO = "cloro-free-demo-key", "cloro-pro-demo-key"
HOLD = {"hold": "1"}  # the profile upstream answers once released


@pytest.fixture
def cloro(redis_url: str, profile: Callable[[str], Path]) -> Iterator[tuple[Proc, ProfileUpstream]]:
    with ProfileUpstream() as upstream, gateway(
        profile("cloro-style.yaml"), env={"UPSTREAM_URL": upstream.url, "GATEWAY_STORE_URL": redis_url}
    ) as gw:
        try:
            yield gw, upstream
        finally:
            release_holds(upstream.url)


def test_cloro_rate_buckets_are_per_endpoint(
    cloro: tuple[Proc, ProfileUpstream], client: httpx.Client
) -> None:
    gw, _ = cloro
    started = time.monotonic()
    first = call(client, gw, "GET", "/v1/search", CLORO_PRO)
    assert first.status_code == 200
    assert (first.headers["x-ratelimit-limit"], first.headers["x-ratelimit-remaining"]) == ("1000", "999")
    assert not any(name.startswith("x-concurrent") for name in first.headers)  # no concurrency here
    assert not any(name.startswith(("concurrency-", "ratelimit")) for name in first.headers)
    burst = [call(client, gw, "GET", "/v1/search", CLORO_PRO) for _ in range(49)]
    assert all(r.status_code == 200 for r in burst)
    # `exact: false` over a 1 s window: if the burst crossed a window edge, the sliding counter
    # weighs the previous window's part by the share of it still inside the sliding window, so
    # up to 50 × (time the burst took) of the 50 no longer count (configuration.md).
    took = time.monotonic() - started
    assert int(burst[-1].headers["x-ratelimit-remaining"]) <= 950 + math.ceil(50 * took)
    # The burst on /v1/search spent nothing of /v1/scrape's bucket, nor of the catch-all's.
    scrape = call(client, gw, "GET", "/v1/scrape", CLORO_PRO)
    assert (scrape.status_code, scrape.headers["x-ratelimit-remaining"]) == (200, "999")
    other = call(client, gw, "GET", "/v1/something-else", CLORO_PRO)
    assert (other.status_code, other.headers["x-ratelimit-remaining"]) == (200, "999")
    # The async task endpoint has no limits at all.
    submitted = call(client, gw, "POST", "/v1/async/task", CLORO_PRO)
    assert submitted.status_code == 200
    assert not any(name.startswith(("x-ratelimit", "x-concurrent")) for name in submitted.headers)


def test_cloro_concurrency_only_on_monitor_endpoints(
    cloro: tuple[Proc, ProfileUpstream], client: httpx.Client, pool: ThreadPoolExecutor
) -> None:
    gw, upstream = cloro
    # pro: 20 monitor slots; 3 sent at once → Current 3, Remaining 17.
    held = []
    for count in (1, 2, 3):
        held.append(pool.submit(call, client, gw, "GET", "/v1/monitor/chatgpt", CLORO_PRO, params=HOLD))
        wait_until(lambda count=count: upstream.stats()["in_flight"] == count)
    release_holds(upstream.url)
    third = held[2].result(10)
    assert third.status_code == 200
    assert (third.headers["x-concurrent-limit"], third.headers["x-concurrent-current"],
            third.headers["x-concurrent-remaining"]) == ("20", "3", "17")
    assert third.headers["x-ratelimit-limit"] == "1000"
    assert all(future.result(10).status_code == 200 for future in held)

    # trial: 1 monitor slot, shared by every monitor endpoint; the 2nd is refused at once.
    upstream.hold_again()
    monitor = pool.submit(call, client, gw, "GET", "/v1/monitor/chatgpt", CLORO_TRIAL, params=HOLD)
    wait_until(lambda: upstream.stats()["in_flight"] == 1)
    started = time.monotonic()
    refused = call(client, gw, "GET", "/v1/monitor/perplexity", CLORO_TRIAL)
    assert time.monotonic() - started < 1.0
    assert refused.status_code == 429 and refused.json()["error"] == "concurrency_limited"
    assert refused.headers["retry-after"] == "1"
    assert (refused.headers["x-concurrent-limit"], refused.headers["x-concurrent-current"],
            refused.headers["x-concurrent-remaining"]) == ("1", "1", "0")
    # Non-monitor endpoints have no concurrency limit: they pass while the slot is taken.
    for path in ("/v1/search", "/v1/scrape", "/v1/extract"):
        assert call(client, gw, "GET", path, CLORO_TRIAL).status_code == 200
    release_holds(upstream.url)
    assert monitor.result(10).status_code == 200
    assert call(client, gw, "GET", "/v1/monitor/perplexity", CLORO_TRIAL).status_code == 200


# -- reader-style: sliding RPM, async jobs as the concurrency unit --------------------------------

READER_FREE = "reader-free-demo-key"
READER_STUDIO_MAIN, READER_STUDIO_CI = "reader-pro-demo-key", "reader-pro-second-demo-key"


@pytest.fixture
def reader(redis_url: str, profile: Callable[[str], Path]) -> Iterator[tuple[Proc, ProfileUpstream]]:
    with ProfileUpstream() as upstream, gateway(
        profile("reader-style.yaml"), env={"UPSTREAM_URL": upstream.url, "GATEWAY_STORE_URL": redis_url}
    ) as gw:
        yield gw, upstream


def test_reader_sliding_rpm_says_exactly_when_to_retry(
    reader: tuple[Proc, ProfileUpstream], client: httpx.Client
) -> None:
    gw, _ = reader
    reads = [call(client, gw, "POST", "/v1/read", READER_FREE) for _ in range(10)]
    assert [r.status_code for r in reads] == [200] * 10
    assert [r.headers["x-ratelimit-remaining"] for r in reads] == [str(9 - i) for i in range(10)]
    refused = call(client, gw, "POST", "/v1/read", READER_FREE)
    assert refused.status_code == 429
    body = refused.json()
    assert body["error"] == "rate_limited"
    assert body["retryAfterSeconds"] == int(refused.headers["retry-after"])
    assert 58 <= body["retryAfterSeconds"] <= 60  # the first of the 10 leaves the window in ~60 s
    # Every /v1/* route spends the same bucket: a status call is refused too.
    assert call(client, gw, "GET", "/v1/jobs/anything", READER_FREE).status_code == 429


def test_reader_jobs_hold_slots_until_done_and_sync_reads_never_do(
    reader: tuple[Proc, ProfileUpstream], client: httpx.Client
) -> None:
    gw, upstream = reader
    urls = [f"https://example.com/{i}" for i in range(1000)]
    batch = call(client, gw, "POST", "/v1/batch", READER_FREE, json={"urls": urls})
    crawl = call(client, gw, "POST", "/v1/crawl", READER_FREE)
    assert (batch.status_code, crawl.status_code) == (201, 201)  # 1,000 URLs: one request, one job
    # The exchanges are over, but both jobs still hold the free tier's 2 slots.
    refused = call(client, gw, "POST", "/v1/batch", READER_FREE)
    assert refused.status_code == 429 and refused.json()["error"] == "concurrency_limited"
    assert refused.headers["retry-after"] == "1" and refused.json()["retryAfterSeconds"] == 1
    assert upstream.stats()["jobs_created"] == 2
    # Synchronous reads are not jobs: they pass with every job slot taken.
    assert call(client, gw, "POST", "/v1/read", READER_FREE).status_code == 200

    batch_id, crawl_id = batch.json()["id"], crawl.json()["id"]
    assert call(client, gw, "GET", f"/v1/jobs/{batch_id}", READER_FREE).json()["status"] == "queued"
    assert call(client, gw, "POST", "/v1/crawl", READER_FREE).status_code == 429  # still processing
    httpx.post(upstream.url + "/_finish")
    # The status poll that shows `completed` frees the job's slot.
    assert call(client, gw, "GET", f"/v1/jobs/{batch_id}", READER_FREE).json()["status"] == "completed"
    third = call(client, gw, "POST", "/v1/crawl", READER_FREE)
    assert third.status_code == 201
    # Cancelling frees the slot too.
    cancelled = call(client, gw, "DELETE", f"/v1/jobs/{third.json()['id']}", READER_FREE)
    assert cancelled.json()["status"] == "cancelled"
    assert call(client, gw, "GET", f"/v1/jobs/{crawl_id}", READER_FREE).json()["status"] == "completed"
    view = httpx.get(f"{gw.admin_url}/v1/keys/free-user").json()
    assert view["active_jobs"] == []
    # 10 RPM: 8 requests admitted so far, status polls included; the two refusals cost nothing.
    reads = [call(client, gw, "POST", "/v1/read", READER_FREE) for _ in range(2)]
    remaining = [read.headers["x-ratelimit-remaining"] for read in reads]
    assert remaining == ["1", "0"]
    assert call(client, gw, "POST", "/v1/read", READER_FREE).json()["error"] == "rate_limited"


def test_reader_key_rpm_override_inside_the_workspace_quota(
    reader: tuple[Proc, ProfileUpstream], client: httpx.Client
) -> None:
    gw, _ = reader
    ci = [call(client, gw, "POST", "/v1/read", READER_STUDIO_CI).status_code for _ in range(21)]
    assert ci == [200] * 20 + [429]  # the key's own cap of 20 ...
    main = [call(client, gw, "POST", "/v1/read", READER_STUDIO_MAIN) for _ in range(41)]
    assert [r.status_code for r in main] == [200] * 40 + [429]  # ... inside the workspace's 60
    assert main[-1].json()["error"] == "rate_limited"
    assert main[-1].json()["retryAfterSeconds"] == int(main[-1].headers["retry-after"])
    assert call(client, gw, "POST", "/v1/read", READER_STUDIO_CI).status_code == 429


# -- zapfetch-style: per-second budgets, a tighter crawl budget, crawl jobs as slots --------------

ZAP_FREE = "zapfetch-free-demo-key"


@pytest.fixture
def zapfetch(redis_url: str, profile: Callable[[str], Path], tmp_path: Path) -> Iterator[Proc]:
    port = free_port()
    log_path = tmp_path / f"example-upstream-{port}.log"
    with open(log_path, "wb") as log:
        upstream = subprocess.Popen(  # no delay: five calls must fit in one second
            [sys.executable, "-m", "gateway", "example-upstream", "--listen", f"127.0.0.1:{port}", "--delay", "0"],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_http(url + "/healthz", upstream, log_path)
        env = {"UPSTREAM_URL": url, "GATEWAY_STORE_URL": redis_url}
        with gateway(profile("zapfetch-style.yaml"), env=env) as gw:
            yield gw
    finally:
        upstream.terminate()
        upstream.wait(10)


def next_second() -> None:
    """Let every 1 s window of the previous requests slide past."""
    time.sleep(1.1)


def test_zapfetch_one_budget_shared_by_every_endpoint(zapfetch: Proc, client: httpx.Client) -> None:
    gw = zapfetch
    spent = [
        call(client, gw, "GET", "/v1/scrape", ZAP_FREE),
        call(client, gw, "POST", "/v1/read", ZAP_FREE),
        call(client, gw, "GET", "/v1/scrape", ZAP_FREE),
        call(client, gw, "POST", "/v1/read", ZAP_FREE),
        call(client, gw, "GET", "/v1/scrape", ZAP_FREE),
    ]
    assert [r.status_code for r in spent] == [200] * 5
    refused = call(client, gw, "POST", "/v1/read", ZAP_FREE)  # the 6th in a second, on any endpoint
    assert refused.status_code == 429
    body = refused.json()
    assert (body["success"], body["error"]) == (False, "rate_limited")
    assert "5" in body["message"] and "free" in body["message"]
    assert refused.headers["retry-after"] == "1" and body["retryAfterSeconds"] == 1
    # Retrying early is refused again and does not push the window back.
    assert call(client, gw, "GET", "/v1/scrape", ZAP_FREE).status_code == 429
    time.sleep(float(refused.headers["retry-after"]) + 0.05)
    assert call(client, gw, "GET", "/v1/scrape", ZAP_FREE).status_code == 200


def test_zapfetch_crawls_have_a_tighter_budget_and_hold_slots(zapfetch: Proc, client: httpx.Client) -> None:
    gw = zapfetch
    crawl_params = {"duration_ms": 20_000}
    first = call(client, gw, "POST", "/v1/crawl", ZAP_FREE, params=crawl_params)
    second = call(client, gw, "POST", "/v1/crawl", ZAP_FREE, params=crawl_params)
    assert (first.status_code, second.status_code) == (201, 201)
    # 2 crawls/s: the third is refused by the crawl budget though the shared budget has room.
    third = call(client, gw, "POST", "/v1/crawl", ZAP_FREE, params=crawl_params)
    assert third.status_code == 429 and third.json()["error"] == "rate_limited"
    assert int(third.headers["retry-after"]) == third.json()["retryAfterSeconds"] >= 1
    assert call(client, gw, "GET", "/v1/scrape", ZAP_FREE).status_code == 200

    next_second()
    # The crawl budget has room again, but both crawl slots are held by running jobs.
    refused = call(client, gw, "POST", "/v1/crawl", ZAP_FREE, params=crawl_params)
    assert refused.status_code == 429 and refused.json()["error"] == "concurrency_limited"
    assert refused.headers["retry-after"] == "1"
    first_id, second_id = first.json()["id"], second.json()["id"]
    status = call(client, gw, "GET", f"/v1/crawl/{first_id}", ZAP_FREE).json()["status"]
    assert status in ("queued", "running")
    # A cancelled crawl no longer counts.
    assert call(client, gw, "DELETE", f"/v1/crawl/{first_id}", ZAP_FREE).json()["status"] == "cancelled"
    replacement = call(client, gw, "POST", "/v1/crawl", ZAP_FREE, params=crawl_params)
    assert replacement.status_code == 201

    next_second()
    for job_id in (second_id, replacement.json()["id"]):
        assert call(client, gw, "DELETE", f"/v1/crawl/{job_id}", ZAP_FREE).json()["status"] == "cancelled"
    assert httpx.get(f"{gw.admin_url}/v1/keys/free-user").json()["active_jobs"] == []
