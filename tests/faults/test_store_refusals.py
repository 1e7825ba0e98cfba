"""A real gateway process and a private redis-server that goes away or refuses the gateway: its
ACL user denied a command the scripts run, its password changed, a wrong password at start.

What must hold: a store-wide refusal opens the breaker like an outage (it is not one key's
problem); `/readyz` comes back once the store answers, with no client traffic; a job `done`
that could not reach the store says 503 (retry), not 404; a refusal at start is logged at once,
without the password.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.faults.conftest import (
    BIG_KEY,
    COOLDOWN,
    SMALL_KEY,
    FaultyRedis,
    fault_config,
    gateway_for,
    get,
    readyz,
)
from tests.support.load import metric
from tests.support.processes import Proc
from tests.support.redis_server import PrivateRedis, private_redis

pytestmark = [pytest.mark.redis, pytest.mark.e2e]

FALLBACKS = "gateway_store_fallback_decisions_total"
PASSWORD, OTHER_PASSWORD = "Gw-Store-Secret-1", "Gw-Store-Other-2"


def ready_within(gw: Proc, seconds: float, strict: bool = False) -> tuple[int, dict[str, Any]]:
    """Poll /readyz (and nothing else) until it answers 200 or `seconds` have passed."""
    deadline = time.monotonic() + seconds
    while True:
        status, body = readyz(gw, strict=strict)
        if status == 200 and body["status"] == "ready" or time.monotonic() > deadline:
            return status, body
        time.sleep(0.2)


def require_password(server: PrivateRedis) -> None:
    """(Set after start: `private_redis` checks the server with an unauthenticated PING.)"""
    with server.client() as admin:
        admin.config_set("requirepass", PASSWORD)


@pytest.mark.parametrize("mode", ["deny", "local"])
def test_readyz_comes_back_after_redis_restarts_with_no_client_traffic(
    mode: str, tmp_path: Path, fresh_upstream: str, faulty_redis: FaultyRedis
) -> None:
    """Before: the breaker closed only on a client request's success, so a replica pulled for
    its 503 (`deny`; `?strict` under `local`) stayed unready for ever after Redis came back."""
    with gateway_for(tmp_path, fault_config(fresh_upstream, faulty_redis.url, on_error=mode)) as gw:
        assert get(gw, BIG_KEY).status_code == 200
        faulty_redis.kill()
        for _ in range(4):  # three failures open the breaker
            get(gw, BIG_KEY)
        status, body = readyz(gw)
        assert body["breaker"] == "open" and status == (503 if mode == "deny" else 200), body
        faulty_redis.restart()
        # From here on no client request: only the orchestrator's probes.
        status, body = ready_within(gw, 3 * COOLDOWN, strict=True)
        assert (status, body) == (200, {"status": "ready", "store": "ok", "breaker": "closed", "on_error": mode})
        assert readyz(gw)[0] == 200
        fallbacks = metric(gw.admin_url, FALLBACKS)
        assert get(gw, BIG_KEY).status_code == 200  # the next request is decided by the store
        assert metric(gw.admin_url, FALLBACKS) == fallbacks
    assert "store answers admissions again" in gw.log()


@pytest.mark.parametrize("mode", ["deny", "local"])
def test_an_acl_denial_inside_a_script_is_store_wide(mode: str, tmp_path: Path, fresh_upstream: str) -> None:
    """Redis 7.0 answers a command the ACL user may not run inside a script with `ERR The user
    executing the script can't run this command ...`, not NOPERM. Before, that was taken for one
    key's problem: the breaker never opened, every request paid a failing call and a failing
    undo, the log blamed another program's key, /readyz said StoreRejected, and under `local` the
    slots held in Redis were not seeded into the local store (no outage, so no bridge)."""
    with private_redis() as server:
        with server.client() as admin:
            admin.execute_command("ACL", "SETUSER", "gw", "on", f">{PASSWORD}", "~*", "&*", "+@all",
                                  "-zremrangebyscore")
        url = f"redis://gw:{PASSWORD}@127.0.0.1:{server.port}/0"
        with gateway_for(tmp_path, fault_config(fresh_upstream, url, on_error=mode)) as gw:
            started = time.monotonic()
            answers = [get(gw, BIG_KEY).status_code for _ in range(10)]
            assert answers == [503 if mode == "deny" else 200] * 10
            if time.monotonic() - started < COOLDOWN:  # (a slow run may have let a probe through)
                # Three failed calls opened the breaker: the other requests did not reach Redis.
                assert metric(gw.admin_url, "gateway_store_errors_total", operation="admit") == 3
            status, body = readyz(gw)
            assert body["breaker"] == "open" and body["detail"] == "StoreError", body
            assert status == (503 if mode == "deny" else 200)
            with server.client() as admin:
                admin.execute_command("ACL", "SETUSER", "gw", "+zremrangebyscore")
            assert ready_within(gw, 3 * COOLDOWN)[0] == 200
            assert get(gw, BIG_KEY).status_code == 200
        log = gw.log()
        assert f"store admission failed, deciding by on_error: {mode}" in log
        assert "another program's key" not in log
        assert PASSWORD not in log


def test_job_done_while_redis_refuses_says_retry_not_unknown(tmp_path: Path, fresh_upstream: str) -> None:
    """Under `on_error: local` there are two job stores, Redis and the local one. Before, Redis
    failing and the local store not knowing the job answered 404 `unknown_job` ("safe to ignore")
    while the job kept its slot in Redis until `max_duration`."""
    config = fault_config(fresh_upstream, "", on_error="local")
    config["plans"]["small"]["limits"]["crawls"] = {"concurrency": 1}
    config["routes"] = [
        {"path": "/jobs", "methods": ["POST"], "limits": ["rpm"],
         "job": {"limit": "crawls", "id": "id", "status_path": "/jobs/{id}", "max_duration": "1h"}},
        {"path": "/**", "limits": ["rpm", "requests"]},
    ]  # fmt: skip
    with private_redis() as server:
        require_password(server)
        config["store"]["url"] = f"redis://:{PASSWORD}@127.0.0.1:{server.port}/0"
        with gateway_for(tmp_path, config) as gw:
            def post_job() -> httpx.Response:
                return httpx.post(gw.url + "/jobs", params={"ms": 600_000}, headers={"X-API-Key": SMALL_KEY},
                                  timeout=10)

            started = post_job()
            assert started.status_code == 201
            job = started.json()["id"]
            assert post_job().status_code == 429  # crawls: 1, held by the job
            admin = redis.Redis(port=server.port, password=PASSWORD, socket_timeout=2)
            admin.config_set("requirepass", OTHER_PASSWORD)  # the gateway's connections: cut, refused
            admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
            refused = httpx.post(f"{gw.admin_url}/v1/jobs/{job}/done", timeout=10)
            assert refused.status_code == 503 and refused.json()["error"] == "store_unavailable", refused.text
            admin.config_set("requirepass", PASSWORD)
            admin.close()
            deadline = time.monotonic() + 5
            while (done := httpx.post(f"{gw.admin_url}/v1/jobs/{job}/done", timeout=10)).status_code == 503:
                assert time.monotonic() < deadline, done.text
                time.sleep(0.2)
            assert done.status_code == 200 and done.json()["freed"] is True, done.text
        assert PASSWORD not in gw.log() and OTHER_PASSWORD not in gw.log()


def test_a_store_refusing_the_gateway_at_start_is_logged_at_once(tmp_path: Path, fresh_upstream: str) -> None:
    """Before: nothing about the store in the log until a client request failed."""
    with private_redis() as server:
        require_password(server)
        url = f"redis://:{OTHER_PASSWORD}@127.0.0.1:{server.port}/0"
        with gateway_for(tmp_path, fault_config(fresh_upstream, url, on_error="deny")) as gw:
            time.sleep(0.3)
            log = gw.log()
        assert "store redis://:***@127.0.0.1" in log and "failed at start" in log, log
        assert "WRONGPASS" in log and OTHER_PASSWORD not in log, log
