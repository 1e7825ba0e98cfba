"""The example scraping API the project ships (`gateway example-upstream`)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from gateway import example_upstream
from gateway.example_upstream import serve_example_upstream

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def api() -> AsyncIterator[httpx.AsyncClient]:
    bound: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    server = asyncio.create_task(serve_example_upstream("127.0.0.1", 0, ready=bound.set_result))
    port = await asyncio.wait_for(bound, 5)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        yield client
    server.cancel()
    with pytest.raises(asyncio.CancelledError):
        await server


async def test_scrape_answers_after_the_delay(api: httpx.AsyncClient) -> None:
    started = time.monotonic()
    response = await api.get(
        "/v1/scrape",
        params={"url": "https://a.example/x", "delay_ms": "200"},
        headers={"X-Gateway-Key-Id": "acme", "X-Gateway-Plan": "pro"},
    )
    assert time.monotonic() - started >= 0.2
    body = response.json()
    assert response.status_code == 200
    assert body["success"] is True and body["url"] == "https://a.example/x" and body["delay_ms"] == 200
    assert body["caller"] == {"key_id": "acme", "plan": "pro"}


async def test_scrape_takes_json_bodies_and_rejects_bad_numbers(api: httpx.AsyncClient) -> None:
    response = await api.post("/v1/scrape", json={"url": "https://b.example/"})
    assert response.json()["url"] == "https://b.example/"
    assert (await api.get("/v1/scrape", params={"delay_ms": "soon"})).status_code == 400


async def test_read(api: httpx.AsyncClient) -> None:
    response = await api.post("/v1/read", params={"url": "https://c.example/"})
    assert response.status_code == 200 and response.json()["markdown"].startswith("# Example page")


async def test_crawl_job_goes_queued_running_completed(api: httpx.AsyncClient) -> None:
    created = await api.post("/v1/crawl", params={"url": "https://d.example/", "duration_ms": "700"})
    assert created.status_code == 201
    job = created.json()
    assert job["status"] == "queued" and len(job["id"]) == 16
    seen = [job["status"]]
    deadline = time.monotonic() + 5
    while seen[-1] != "completed" and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        status = (await api.get(f"/v1/crawl/{job['id']}")).json()["status"]
        if status != seen[-1]:
            seen.append(status)
    assert seen == ["queued", "running", "completed"]


async def test_crawl_job_can_be_cancelled(api: httpx.AsyncClient) -> None:
    job = (await api.post("/v1/crawl")).json()
    cancelled = await api.delete(f"/v1/crawl/{job['id']}")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert (await api.get(f"/v1/crawl/{job['id']}")).json()["status"] == "cancelled"


async def test_unknown_job_is_404(api: httpx.AsyncClient) -> None:
    assert (await api.get("/v1/crawl/nope")).status_code == 404
    assert (await api.delete("/v1/crawl/nope")).status_code == 404


def test_bad_listen_address_is_a_usage_error() -> None:
    with pytest.raises(SystemExit):
        example_upstream.main(["--listen", "nowhere"])


def test_runs_as_a_module() -> None:
    with subprocess.Popen(
        [sys.executable, "-m", "gateway.example_upstream", "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        text=True,
    ) as process:
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            assert line.startswith("example upstream listening on http://127.0.0.1:")
            url = line.rsplit(" ", 1)[1].strip()
            assert httpx.get(f"{url}/healthz").json() == {"ok": True}
        finally:
            process.terminate()
            process.wait(5)
