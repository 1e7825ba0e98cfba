"""Secrets never appear in logs, metrics, Redis key names or upstream requests.

Runs last (its directory sorts last): first a scenario that walks every path a secret could
leak through (key in each place, wrong keys, 401/413/429/502/504, disconnects, the admin
token), then a sweep of every gateway log this test session wrote for the SENTINEL mark that
every test secret carries (tests/support/secrets.py).
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import httpx
import pytest
import redis

from gateway.admission.identity import hash_key
from tests.support.processes import GATEWAY_LOGS, gateway, mock_upstream, write_config
from tests.support.secrets import MARK, secret

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

KEY = secret("audit")
PLAIN = secret("audit-plain")
WRONG = secret("audit-wrong")
UPSTREAM_TOKEN = secret("upstream-token")
ADMIN_TOKEN = secret("admin")


def test_no_secret_in_logs_metrics_redis_or_upstream(tmp_path: Path, redis_url: str, redis_sync: redis.Redis) -> None:
    with mock_upstream() as upstream:
        config = write_config(tmp_path / "audit.yaml", {
            "admin_token": "${AUDIT_ADMIN_TOKEN}",
            "upstream": {"url": upstream, "timeout": "500ms",
                         "set_headers": {"X-Upstream-Token": "${AUDIT_UPSTREAM_TOKEN}"}},
            "store": {"url": redis_url, "prefix": "gwaudit"},
            "max_request_body": "1KB",
            "keys": [
                {"id": "audit", "sha256": hash_key(KEY), "plan": "p"},
                {"id": "audit-plain", "key": PLAIN, "plan": "p"},
            ],
            "plans": {"p": {"limits": {"rpm": {"rate": "10/1m"}, "requests": {"concurrency": 3}}}},
            "routes": [{"path": "/**", "limits": ["rpm", "requests"]}],
        })
        env = {"AUDIT_ADMIN_TOKEN": ADMIN_TOKEN, "AUDIT_UPSTREAM_TOKEN": UPSTREAM_TOKEN}
        with gateway(config, env=env) as gw:
            url = gw.url
            httpx.get(url + "/echo", headers={"X-API-Key": KEY})
            httpx.get(url + "/echo", headers={"Authorization": f"Bearer {PLAIN}"})
            httpx.get(url + f"/echo?apikey={KEY}&x=1")
            httpx.get(url + f"/echo?apikey={WRONG}")
            httpx.get(url + "/echo", headers={"X-API-Key": WRONG})
            httpx.get(url + "/echo", headers={"Authorization": f"Bearer {WRONG}"})
            httpx.post(url + "/upload", headers={"X-API-Key": KEY}, content=b"x" * 5000)
            httpx.get(url + "/invalid_headers", headers={"X-API-Key": KEY})
            httpx.get(url + "/delay_headers?ms=2000", headers={"X-API-Key": KEY}, timeout=10)
            with socket.create_connection(("127.0.0.1", gw.port)) as sock:
                sock.sendall(f"GET /hold?ms=5000&apikey={KEY} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                time.sleep(0.3)
            for _ in range(6):  # past the rate limit
                httpx.get(url + f"/echo?apikey={KEY}")
            assert httpx.get(gw.admin_url + "/metrics").status_code == 401
            assert httpx.get(gw.admin_url + "/metrics", headers={"Authorization": f"Bearer {WRONG}"}).status_code == 401
            metrics = httpx.get(gw.admin_url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
            assert metrics.status_code == 200
            stats = httpx.get(upstream + "/_stats").json()
        assert gw.process.returncode == 0
        log = gw.log()

    assert MARK not in metrics.text
    assert '"outcome":"rate_limited"' in log and '"status":502' in log and '"status":504' in log
    assert MARK not in log
    key_names = [name.decode() for name in redis_sync.scan_iter(match="*")]
    assert key_names and not any(MARK in name for name in key_names)
    # the upstream gets its own token and nothing else secret
    for key_stats in stats["keys"].values():
        last = key_stats["last"]
        headers = {name.lower(): value for name, value in last["headers"]}
        assert headers.get("x-upstream-token") == UPSTREAM_TOKEN
        del headers["x-upstream-token"]
        assert MARK not in json.dumps(headers) and MARK not in last.get("query", "")


def test_no_secret_in_any_gateway_log_of_this_session() -> None:
    assert GATEWAY_LOGS, "the sweep needs the suite's gateway logs (run the whole suite)"
    for path in GATEWAY_LOGS:
        if path.exists():
            text = path.read_text(errors="replace")
            assert MARK not in text, f"{path} contains a test secret"
