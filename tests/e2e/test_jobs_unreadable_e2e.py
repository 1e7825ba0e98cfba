"""Job answers a client could make unreadable (docs/behaviour.md, "Jobs that hold a concurrency
slot"), end to end: real `gateway serve` processes in front of an upstream that answers in the
coding the request asks for (zstd and gzip, as a CDN in front of an API does), pads its answers
past 64 KiB on request, or ignores `Accept-Encoding` altogether.

- A client asking for zstd or br, or making the start answer large, still gets no more jobs
  than its plan allows: the gateway forwards only the codings it reads, and reads the id
  wherever it is in the body.
- A 2xx start answer whose id the gateway still cannot read holds the slot (fail closed) under
  a synthetic id, ended by the admin call or `max_duration`.
- A status answer that says `completed` frees the slot whatever its size or the coding asked for.
"""

from __future__ import annotations

import asyncio
import gzip
import itertools
import json
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from gateway.admission.identity import hash_key
from tests.support.processes import Proc, gateway, write_config

pytestmark = pytest.mark.e2e

ALICE = "alice-secret-key-1"
A = {"X-API-Key": ALICE}


def _zstd(data: bytes) -> bytes:
    return subprocess.run(["zstd", "-q", "-c"], input=data, capture_output=True, check=True).stdout


def _unzstd(data: bytes) -> bytes:
    return subprocess.run(["zstd", "-q", "-d", "-c"], input=data, capture_output=True, check=True).stdout


class CodingUpstream:
    """A job API that compresses as asked (zstd first, then gzip), in a thread of the test.

    POST /jobs [pad=N: N bytes before the id][force=zstd: whatever was asked][broken=1: not JSON]
    [idlen=N: an id of N characters]; GET|DELETE /jobs/{id} [state=][pad=N: crawl data before
    the status]. `accept_encodings` records what each request asked for."""

    def __init__(self) -> None:
        self.accept_encodings: list[str | None] = []
        self.started: list[str] = []
        self._ids = itertools.count(1)
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def __enter__(self) -> CodingUpstream:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), daemon=True)
        self._thread.start()
        assert ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._runner is not None
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        assert self._thread is not None
        self._thread.join(10)
        self._loop.close()

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_route("POST", "/jobs", self._start)
        app.router.add_route("*", "/jobs/{id}", self._status)
        app.router.add_route("GET", "/echo", self._echo)
        self._runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        ready.set()
        self._loop.run_forever()

    def _answer(self, request: web.Request, body: bytes, status: int = 200) -> web.Response:
        asked = request.headers.get("Accept-Encoding", "")
        self.accept_encodings.append(request.headers.get("Accept-Encoding"))
        headers = {"Content-Type": "application/json"}
        if "zstd" in asked or request.query.get("force") == "zstd":
            body, headers["Content-Encoding"] = _zstd(body), "zstd"
        elif "gzip" in asked:
            body, headers["Content-Encoding"] = gzip.compress(body), "gzip"
        return web.Response(body=body, status=status, headers=headers)

    async def _start(self, request: web.Request) -> web.Response:
        query = request.query
        job_id = f"job-{next(self._ids)}" + "x" * max(0, int(query.get("idlen", "0")) - 6)
        self.started.append(job_id)
        if query.get("broken"):
            return self._answer(request, b"<html>accepted</html>", 201)
        document: dict[str, Any] = {}
        if query.get("pad"):
            document["echo"] = "x" * int(query["pad"])  # e.g. the submitted URL list, echoed
        document.update(id=job_id, status="queued")
        return self._answer(request, json.dumps(document).encode(), 201)

    async def _echo(self, request: web.Request) -> web.Response:
        return self._answer(request, b"{}")

    async def _status(self, request: web.Request) -> web.Response:
        state = request.query.get("state", "cancelled" if request.method == "DELETE" else "running")
        document: dict[str, Any] = {"id": request.match_info["id"]}
        if request.query.get("pad"):  # Firecrawl-style crawl data, here before the status
            document["data"] = [{"markdown": "y" * 1000}] * (int(request.query["pad"]) // 1000)
        document["status"] = state
        return self._answer(request, json.dumps(document).encode())


@pytest.fixture(scope="module")
def upstream() -> Iterator[CodingUpstream]:
    with CodingUpstream() as server:
        yield server


@pytest.fixture
def start(tmp_path: Path, upstream: CodingUpstream) -> Iterator[Callable[..., Proc]]:
    contexts: list[Any] = []

    def started(crawls: int = 2, store: str = "memory://") -> Proc:
        config = {
            "upstream": {"url": upstream.url, "timeout": "10s"},
            "store": {"url": store, "prefix": "gwunread", "timeout": "500ms", "lease": "5s", "on_error": "deny"},
            "keys": [{"id": "alice", "sha256": hash_key(ALICE), "plan": "p"}],
            "plans": {"p": {"limits": {"rpm": {"rate": "100000/1m"}, "crawls": {"concurrency": crawls}}}},
            "routes": [
                {"path": "/jobs", "methods": ["POST"], "limits": ["rpm"],
                 "job": {"limit": "crawls", "id": "id", "status_path": "/jobs/{id}", "max_duration": "1h"}},
                {"path": "/**", "limits": ["rpm"]},
            ],
        }  # fmt: skip
        context = gateway(write_config(tmp_path / f"gw{len(contexts)}.yaml", config))
        contexts.append(context)
        return context.__enter__()

    yield started
    for context in reversed(contexts):
        context.__exit__(None, None, None)


def post_job(gw: Proc, accept: str | None = None, **params: Any) -> httpx.Response:
    headers = {**A, "Accept-Encoding": accept} if accept else {**A, "Accept-Encoding": "identity"}
    return httpx.post(gw.url + "/jobs", params=params, headers=headers, timeout=10)


def document(response: httpx.Response) -> Any:
    """The JSON the client reads, whatever the coding (httpx reads gzip itself, not zstd)."""
    if response.headers.get("content-encoding") == "zstd":
        return json.loads(_unzstd(response.content))
    return response.json()


def active_jobs(gw: Proc) -> list[str]:
    view = httpx.get(f"{gw.admin_url}/v1/keys/alice").json()
    return sorted(job["job_id"] for job in view["active_jobs"])


def end_all(gw: Proc) -> None:
    for job_id in active_jobs(gw):
        assert httpx.post(f"{gw.admin_url}/v1/jobs/{job_id}/done").status_code == 200


@pytest.mark.parametrize("accept", ["zstd", "br", "br, zstd;q=0.9, *;q=0.1"])
def test_asking_for_a_coding_the_gateway_cannot_read_starts_no_extra_job(
    start: Callable[..., Proc], upstream: CodingUpstream, accept: str
) -> None:
    gw = start(crawls=2)
    first, second = post_job(gw, accept), post_job(gw, accept)
    assert (first.status_code, second.status_code) == (201, 201)
    ids = sorted(document(r)["id"] for r in (first, second))
    assert active_jobs(gw) == ids  # held under their own ids: the answers were readable
    refused = post_job(gw, accept)
    assert refused.status_code == 429 and refused.json()["error"] == "concurrency_limited"
    assert upstream.accept_encodings[-2:] == ["identity", "identity"]  # nothing else was left
    end_all(gw)


def test_the_clients_readable_codings_go_on_with_their_q_values(
    start: Callable[..., Proc], upstream: CodingUpstream
) -> None:
    gw = start(crawls=1)
    started = post_job(gw, "zstd, gzip;q=0.8, br, deflate;q=0")
    assert started.status_code == 201 and started.headers["content-encoding"] == "gzip"
    assert upstream.accept_encodings[-1] == "gzip;q=0.8, deflate;q=0"
    assert active_jobs(gw) == [started.json()["id"]]
    status = httpx.get(f"{gw.url}/jobs/{started.json()['id']}", headers={**A, "Accept-Encoding": "zstd, gzip"})
    assert status.json()["status"] == "running" and upstream.accept_encodings[-1] == "gzip"
    assert post_job(gw).status_code == 429
    end_all(gw)


def test_a_start_answer_over_64_kib_still_hands_the_slot_to_the_job(start: Callable[..., Proc]) -> None:
    gw = start(crawls=2)
    answers = [post_job(gw, pad=70_000), post_job(gw, "gzip", pad=200_000)]
    assert [r.status_code for r in answers] == [201, 201]
    assert len(answers[0].content) > 70_000
    assert active_jobs(gw) == sorted(r.json()["id"] for r in answers)  # ids after the padding
    assert post_job(gw, pad=70_000).status_code == 429
    end_all(gw)


def test_a_start_answer_the_gateway_cannot_read_holds_the_slot_anyway(
    start: Callable[..., Proc], upstream: CodingUpstream
) -> None:
    """Fail closed: an upstream that answers zstd unasked, a 201 that is not JSON, an id that
    cannot be one. The upstream may be running a job the client knows the id of, so the slot
    is held under a synthetic id until the admin call (or max_duration)."""
    gw = start(crawls=1)
    for params in ({"force": "zstd"}, {"broken": "1"}, {"idlen": "300"}):
        held = post_job(gw, **params)
        assert held.status_code == 201, params
        [synthetic] = active_jobs(gw)
        assert synthetic.startswith("unread-"), params
        assert post_job(gw).status_code == 429, params
        done = httpx.post(f"{gw.admin_url}/v1/jobs/{synthetic}/done")
        assert done.json() == {"success": True, "job_id": synthetic, "key_id": "alice", "freed": True}
        assert active_jobs(gw) == []
    assert "cannot be read" in gw.log()  # the operator is told, with the id to end it by


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_a_completed_status_answer_frees_the_slot_whatever_its_size_or_coding(
    start: Callable[..., Proc], request: pytest.FixtureRequest, store: str
) -> None:
    url = "memory://" if store == "memory" else request.getfixturevalue("redis_url")
    gw = start(crawls=3, store=url)
    big, zstd, both = (post_job(gw).json()["id"] for _ in range(3))
    assert post_job(gw).status_code == 429
    # Crawl data (80 KB) before the status field, then the status of a client asking for zstd.
    polled = httpx.get(f"{gw.url}/jobs/{big}", params={"state": "completed", "pad": 80_000}, headers=A)
    assert polled.json()["status"] == "completed" and len(polled.content) > 80_000
    asked = httpx.get(f"{gw.url}/jobs/{zstd}", params={"state": "completed"}, headers={**A, "Accept-Encoding": "zstd"})
    assert document(asked)["status"] == "completed"
    assert active_jobs(gw) == [both]
    # A client that sees `completed` can start its next job at once.
    assert post_job(gw).status_code == 201
    gzipped = httpx.get(f"{gw.url}/jobs/{both}", params={"state": "completed", "pad": 300_000},
                        headers={**A, "Accept-Encoding": "zstd, gzip"})
    assert gzipped.headers["content-encoding"] == "gzip" and gzipped.json()["status"] == "completed"
    assert post_job(gw).status_code == 201
    end_all(gw)


def test_other_requests_ask_for_what_the_client_asked_for(start: Callable[..., Proc], upstream: CodingUpstream) -> None:
    gw = start()
    answer = httpx.get(gw.url + "/echo", headers={**A, "Accept-Encoding": "zstd, br"})
    assert answer.status_code == 200 and answer.headers["content-encoding"] == "zstd"
    assert upstream.accept_encodings[-1] == "zstd, br"  # not a job request: forwarded as it came
