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


async def test_the_request_shapes_of_the_provider_profiles(api: httpx.AsyncClient) -> None:
    """What the config/*-style.yaml profiles' SDKs send, answered as those APIs do."""
    zenrows = await api.get("/v1/", params={"url": "https://example.org/x", "js_render": "true"})
    assert zenrows.status_code == 200 and zenrows.headers["content-type"].startswith("text/html")
    assert "Example page for https://example.org/x" in zenrows.text
    for path, body, field in (("/v1/search", {"query": "q"}, "data"), ("/v1/map", {"url": "https://a.b"}, "links"),
                              ("/v1/extract", {"url": "https://a.b"}, "data"),
                              ("/v1/monitor/chatgpt", {"prompt": "hi"}, "answer"),
                              ("/v1/read", {"url": "https://a.b"}, "markdown")):
        answer = await api.post(path, json=body)
        assert answer.status_code == 200 and answer.json()["success"] is True and field in answer.json(), path
    queued = await api.post("/v1/async/chatgpt", json={"prompt": "hi"})
    assert queued.status_code == 202 and queued.json()["status"] == "queued"
    batch = await api.post("/v1/batch", json={"urls": ["https://a.b/1", "https://a.b/2"], "duration_ms": 50})
    assert batch.status_code == 201 and batch.json()["url"] == "2 URLs"
    job_id = batch.json()["id"]
    assert (await api.get(f"/v1/jobs/{job_id}")).json()["status"] == "queued"
    await asyncio.sleep(0.1)
    assert (await api.get(f"/v1/jobs/{job_id}")).json()["status"] == "completed"


def test_the_command_has_a_default_delay_and_says_when_its_port_is_taken() -> None:
    """`--delay` defaults to 500ms (concurrency limits visible by hand); a taken port ends it
    with status 1 and one line, no traceback."""
    with subprocess.Popen(
        [sys.executable, "-m", "gateway", "example-upstream", "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, text=True,
    ) as process:
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            url = line.rsplit(" ", 1)[1].strip()
            started = time.monotonic()
            assert httpx.get(f"{url}/v1/?url=https://a.b").status_code == 200
            assert time.monotonic() - started >= 0.5
            assert httpx.get(f"{url}/v1/scrape?delay_ms=0").json()["delay_ms"] == 0
            port = url.rsplit(":", 1)[1]
            taken = subprocess.run(
                [sys.executable, "-m", "gateway", "example-upstream", "--listen", f"127.0.0.1:{port}"],
                capture_output=True, text=True, timeout=30,
            )
            assert taken.returncode == 1
            assert taken.stderr == f"gateway example-upstream: cannot listen on 127.0.0.1:{port}: " \
                                   "Address already in use\n"
        finally:
            process.terminate()
            assert process.wait(5) == 0  # SIGTERM is a clean stop
