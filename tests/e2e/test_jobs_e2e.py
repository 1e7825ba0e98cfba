"""Async jobs holding concurrency slots (SPEC §3 `routes[].job`), end to end: real `gateway
serve` processes in front of the mock upstream's job API, which counts the jobs of each key
that are active at any moment. Every way a job ends frees its slot; a slot never outlives its
job by more than `max_duration`; another key cannot free a job; two gateways on one Redis
never let a key run more jobs than its limit."""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
import redis

from gateway.admission.identity import hash_key
from tests.support.invariants import assert_no_leaks
from tests.support.processes import Proc, gateway, mock_upstream, write_config

pytestmark = pytest.mark.e2e

ALICE, BOB = "alice-secret-key-1", "bob-secret-key-22"
ADMIN_TOKEN = "admin-token-for-jobs"
PREFIX = "gwjobs"


def job_config(upstream: str, crawls: int = 2, max_duration: str = "30s", store: str = "memory://",
               admin_token: str | None = None) -> dict[str, Any]:
    config: dict[str, Any] = {
        "upstream": {"url": upstream, "timeout": "10s"},
        "store": {"url": store, "prefix": PREFIX, "timeout": "500ms", "lease": "5s", "on_error": "deny"},
        "keys": [
            {"id": "alice", "sha256": hash_key(ALICE), "plan": "p"},
            {"id": "bob", "sha256": hash_key(BOB), "plan": "p"},
        ],
        "plans": {"p": {"limits": {"rpm": {"rate": "100000/1m"}, "crawls": {"concurrency": crawls}}}},
        "routes": [
            {"path": "/jobs", "methods": ["POST"], "limits": ["rpm"],
             "job": {"limit": "crawls", "id": "id", "status_path": "/jobs/{id}", "status_field": "status",
                     "done": ["completed", "cancelled"], "max_duration": max_duration}},
            {"path": "/**", "limits": ["rpm"]},
        ],
    }  # fmt: skip
    if admin_token:
        config["admin_token"] = admin_token
    return config


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with mock_upstream() as url:
        yield url


@pytest.fixture
def start(tmp_path: Path, upstream: str) -> Iterator[Callable[..., Proc]]:
    """Start a gateway with job_config(**overrides); stopped at the end of the test."""
    httpx.post(upstream + "/_reset")
    procs: list[Any] = []

    def started(**overrides: Any) -> Proc:
        path = write_config(tmp_path / f"gw{len(procs)}.yaml", job_config(upstream, **overrides))
        context = gateway(path)
        procs.append(context)
        return context.__enter__()

    yield started
    for context in reversed(procs):
        context.__exit__(None, None, None)


def post_job(gw: Proc, secret: str = ALICE, **params: Any) -> httpx.Response:
    query = {"ms": 60_000, **params}
    return httpx.post(gw.url + "/jobs", params=query, headers={"X-API-Key": secret}, timeout=10)


def key_stats(upstream: str, key: str) -> dict[str, Any]:
    return httpx.get(upstream + "/_stats").json()["keys"].get(key, {})


def key_view(gw: Proc, key: str, token: str | None = None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = httpx.get(f"{gw.admin_url}/v1/keys/{key}", headers=headers)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def wait_until(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return check()


def test_a_job_holds_its_slot_until_a_status_request_shows_it_done(
    start: Callable[..., Proc], upstream: str
) -> None:
    gw = start()
    first, second = post_job(gw), post_job(gw)
    assert (first.status_code, second.status_code) == (201, 201)
    assert (first.headers["concurrency-limit"], first.headers["concurrency-remaining"]) == ("2", "1")
    assert second.headers["concurrency-remaining"] == "0"
    refused = post_job(gw)
    assert refused.status_code == 429 and refused.json()["error"] == "concurrency_limited"
    assert refused.headers["retry-after"] == "1"
    assert key_stats(upstream, "alice")["jobs_created"] == 2  # the refused one never reached it

    view = key_view(gw, "alice")
    listed = sorted(job["job_id"] for job in view["active_jobs"])
    assert listed == sorted([first.json()["id"], second.json()["id"]])
    assert view["limits"]["crawls"] == {"limit": 2, "plan_limit": 2, "override": None, "scope": "key",
                                        "kind": "concurrency", "wait_seconds": 0.0, "shadow": False}
    assert view["active_slots"] == {"crawls": 2}

    job = first.json()["id"]
    running = httpx.get(f"{gw.url}/jobs/{job}", headers={"X-API-Key": ALICE})
    assert running.json()["status"] == "running"
    assert post_job(gw).status_code == 429  # a status that is not done frees nothing
    # Another key polling alice's job (even once it is done) frees nothing: not theirs.
    httpx.post(upstream + "/_jobs/finish")
    assert httpx.get(f"{gw.url}/jobs/{job}", headers={"X-API-Key": BOB}).json()["status"] == "completed"
    assert post_job(gw).status_code == 429
    # The owner's status request shows it done: freed before the answer reaches the client.
    assert httpx.get(f"{gw.url}/jobs/{job}", headers={"X-API-Key": ALICE}).json()["status"] == "completed"
    third = post_job(gw)
    assert third.status_code == 201 and third.headers["concurrency-remaining"] == "0"
    assert [j["job_id"] for j in key_view(gw, "alice")["active_jobs"]].count(job) == 0


def test_a_cancelled_job_frees_its_slot(start: Callable[..., Proc]) -> None:
    gw = start(crawls=1)
    job = post_job(gw).json()["id"]
    assert post_job(gw).status_code == 429
    assert httpx.delete(f"{gw.url}/jobs/{job}", headers={"X-API-Key": BOB}).status_code == 200  # not bob's
    assert post_job(gw).status_code == 429
    cancelled = httpx.delete(f"{gw.url}/jobs/{job}", headers={"X-API-Key": ALICE})
    assert cancelled.status_code == 200
    assert post_job(gw).status_code == 201
    # A DELETE that fails upstream frees nothing.
    assert httpx.delete(f"{gw.url}/jobs/no-such-job", headers={"X-API-Key": ALICE}).status_code == 404
    assert post_job(gw).status_code == 429


def test_the_upstreams_done_call_frees_the_slot(start: Callable[..., Proc], upstream: str) -> None:
    gw = start(crawls=1)
    hook = f"{gw.admin_url}/v1/jobs/{{id}}/done"
    assert post_job(gw, ms=300, webhook=hook).status_code == 201
    assert post_job(gw).status_code == 429
    assert wait_until(lambda: not key_view(gw, "alice")["active_jobs"])  # the upstream called back
    assert post_job(gw, ms=100, webhook=hook, webhook_first=1).status_code == 201
    # That job's end overtook its own 201: the slot was freed at once, not held.
    assert key_view(gw, "alice")["active_jobs"] == []
    assert post_job(gw).status_code == 201
    missing = httpx.post(f"{gw.admin_url}/v1/jobs/unknown-job/done")
    assert missing.status_code == 404 and missing.json()["error"] == "unknown_job"


def test_the_done_call_wants_the_admin_token(start: Callable[..., Proc]) -> None:
    gw = start(crawls=1, admin_token=ADMIN_TOKEN)
    job = post_job(gw).json()["id"]
    assert httpx.post(f"{gw.admin_url}/v1/jobs/{job}/done").status_code == 401
    assert httpx.get(f"{gw.admin_url}/v1/keys/alice").status_code == 401
    assert post_job(gw).status_code == 429
    bearer = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    done = httpx.post(f"{gw.admin_url}/v1/jobs/{job}/done", headers=bearer)
    assert done.json() == {"success": True, "job_id": job, "key_id": "alice", "freed": True}
    assert post_job(gw).status_code == 201
    assert key_view(gw, "alice", ADMIN_TOKEN)["active_slots"] == {"crawls": 1}


def test_max_duration_frees_the_slot(start: Callable[..., Proc]) -> None:
    gw = start(crawls=1, max_duration="1s")
    started = time.monotonic()
    assert post_job(gw).status_code == 201
    assert post_job(gw).status_code == 429
    assert wait_until(lambda: post_job(gw).status_code == 201, timeout=5)
    assert time.monotonic() - started >= 0.95


def test_refused_or_idless_answers_free_the_slot_at_once(start: Callable[..., Proc], upstream: str) -> None:
    gw = start(crawls=1)
    failed = post_job(gw, status=500)
    assert failed.status_code == 500
    idless = post_job(gw, noid=1)
    assert idless.status_code == 201 and "id" not in idless.json()
    assert key_view(gw, "alice")["active_jobs"] == []
    assert post_job(gw).status_code == 201
    assert post_job(gw).status_code == 429


@pytest.mark.parametrize("when", ["before_the_upstream_started_it", "after_the_upstream_started_it"])
def test_a_job_started_after_its_client_left_holds_its_slot(
    start: Callable[..., Proc], upstream: str, when: str
) -> None:
    """The client leaves once its start has gone upstream (a timeout, or on purpose: a client
    that learns the id by webhook need not wait). The upstream starts the job all the same, so
    the gateway reads the answer on and the job holds its slot. Before: the upstream request
    was cancelled and the slot freed, and a client leaving every start at once ran any number
    of jobs on a 1-job plan (the upstream's `jobs_max_active` was 2 here)."""
    gw = start(crawls=1)
    params = {"ms": 60_000, "webhook": gw.admin_url + "/v1/jobs/{id}/done"}
    params |= {"delay_ms": 500} if when == "before_the_upstream_started_it" else {"answer_ms": 500}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(gw.url + "/jobs", params=params, headers={"X-API-Key": ALICE}, timeout=0.2)
    assert wait_until(lambda: key_stats(upstream, "alice").get("jobs_created") == 1)
    assert wait_until(lambda: len(key_view(gw, "alice")["active_jobs"]) == 1)
    refused = post_job(gw)
    assert refused.status_code == 429 and refused.json()["error"] == "concurrency_limited"
    assert key_stats(upstream, "alice")["jobs_max_active"] == 1
    [job] = key_view(gw, "alice")["active_jobs"]
    assert httpx.post(f"{gw.admin_url}/v1/jobs/{job['job_id']}/done").status_code == 200
    assert post_job(gw).status_code == 201


def test_a_client_that_leaves_before_its_start_went_upstream_leaves_no_slot(
    start: Callable[..., Proc], upstream: str
) -> None:
    """A client gone before its request went upstream: nothing goes upstream, nothing is held."""
    gw = start(crawls=1)
    with socket.create_connection(("127.0.0.1", gw.port)) as sock:
        sock.sendall(b"POST /jobs?ms=60000 HTTP/1.1\r\nHost: x\r\nX-API-Key: " + ALICE.encode()
                     + b"\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)  # then leaves mid-body
    time.sleep(0.5)
    assert key_stats(upstream, "alice").get("jobs_created", 0) == 0
    assert post_job(gw).status_code == 201


# -- two gateways on one Redis under load --------------------------------------------------


async def _job_client(session: aiohttp.ClientSession, urls: list[str], admin_urls: list[str], seed: int,
                      until: float, outcomes: Counter[str]) -> None:
    rng = random.Random(seed)
    headers = {"X-API-Key": ALICE}
    while time.monotonic() < until:
        base = rng.choice(urls)
        ending = rng.choice(["poll", "delete", "webhook", "abandon"])
        params = {"ms": str(rng.randint(50, 300))}
        if ending == "webhook":
            params["webhook"] = rng.choice(admin_urls) + "/v1/jobs/{id}/done"
        async with session.post(base + "/jobs", params=params, headers=headers) as response:
            body = await response.json(content_type=None)
            outcomes[str(response.status)] += 1
        if response.status != 201:
            await asyncio.sleep(rng.uniform(0.005, 0.03))
            continue
        outcomes[ending] += 1
        job_url = f"{rng.choice(urls)}/jobs/{body['id']}"
        if ending == "poll":
            while True:
                async with session.get(job_url, headers=headers) as status:
                    if (await status.json(content_type=None))["status"] in ("completed", "cancelled"):
                        break
                await asyncio.sleep(0.03)
        elif ending == "delete":
            await asyncio.sleep(rng.uniform(0, 0.1))
            async with session.delete(job_url, headers=headers) as cancelled:
                assert cancelled.status == 200


@pytest.mark.redis
def test_jobs_never_exceed_the_limit_across_two_gateways(
    start: Callable[..., Proc], upstream: str, redis_url: str, redis_sync: redis.Redis
) -> None:
    limit = 3
    # Abandoned jobs end upstream within 300 ms and are freed by max_duration (1 s), later.
    a = start(crawls=limit, max_duration="1s", store=redis_url)
    b = start(crawls=limit, max_duration="1s", store=redis_url)

    async def run() -> Counter[str]:
        outcomes: Counter[str] = Counter()
        until = time.monotonic() + 5
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
            await asyncio.gather(*(
                _job_client(session, [a.url, b.url], [a.admin_url, b.admin_url], seed, until, outcomes)
                for seed in range(12)
            ))  # fmt: skip
        return outcomes

    outcomes = asyncio.run(run())
    stats = key_stats(upstream, "alice")
    assert stats["jobs_max_active"] <= limit  # what the upstream saw, at every moment
    assert stats["jobs_max_active"] == limit  # the load did fill every slot
    assert stats["jobs_created"] == outcomes["201"]
    assert outcomes["429"] > 0
    assert min(outcomes[ending] for ending in ("poll", "delete", "webhook", "abandon")) > 0
    assert set(outcomes) <= {"201", "429", "poll", "delete", "webhook", "abandon"}
    # Everything ends: after max_duration no slot is held, on either gateway.
    time.sleep(1.1)
    def nothing_held() -> bool:
        return all(key_view(gw, "alice")["active_slots"] == {"crawls": 0} for gw in (a, b))

    assert wait_until(nothing_held)
    assert post_job(a).status_code == 201  # admission also purges what expired
    last = key_view(a, "alice")["active_jobs"][0]["job_id"]
    assert httpx.post(f"{a.admin_url}/v1/jobs/{last}/done").status_code == 200
    assert_no_leaks(redis_sync, PREFIX)
