"""A real Prometheus server scrapes the admin port and answers a query about the gateway."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from gateway.admission.identity import hash_key
from tests.support.processes import gateway, mock_upstream, write_config
from tests.support.redis_server import free_port
from tests.support.secrets import secret

pytestmark = pytest.mark.e2e


def _prometheus() -> str:
    binary = shutil.which("prometheus")
    if binary is None:
        if os.environ.get("GATEWAY_REQUIRE_TOOLS") == "1":
            pytest.fail("prometheus not installed but GATEWAY_REQUIRE_TOOLS=1")
        pytest.skip("prometheus not installed (Debian package prometheus)")
    return binary


def test_prometheus_scrapes_the_admin_port(tmp_path: Path) -> None:
    binary = _prometheus()
    with mock_upstream() as upstream:
        config = write_config(tmp_path / "gw.yaml", {
            "upstream": {"url": upstream},
            "keys": [{"id": "k", "sha256": hash_key(secret("scrape")), "plan": "p"}],
            "plans": {"p": {"limits": {"rpm": {"rate": "4/1m"}}}},
            "routes": [{"path": "/**", "limits": ["rpm"]}],
        })
        with gateway(config) as gw:
            statuses = [httpx.get(gw.url + "/", headers={"X-API-Key": secret("scrape")}).status_code
                        for _ in range(7)]
            assert statuses == [200] * 4 + [429] * 3
            port = free_port()
            (tmp_path / "prometheus.yml").write_text(
                "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
                "scrape_configs:\n"
                f"  - job_name: gateway\n    static_configs: [{{targets: ['127.0.0.1:{gw.admin_port}']}}]\n"
            )
            prometheus = subprocess.Popen(
                [binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{port}"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            try:
                query = 'sum by (outcome) (gateway_requests_total{job="gateway"})'
                deadline = time.monotonic() + 30
                values: dict[str, float] = {}
                while time.monotonic() < deadline:
                    try:
                        answer = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": query}).json()
                        values = {r["metric"]["outcome"]: float(r["value"][1]) for r in answer["data"]["result"]}
                    except (httpx.HTTPError, KeyError, ValueError):
                        pass
                    if values:
                        break
                    time.sleep(0.5)
                targets = httpx.get(f"http://127.0.0.1:{port}/api/v1/targets").json()["data"]["activeTargets"]
            finally:
                prometheus.terminate()
                prometheus.wait(10)
    assert values == {"admitted": 4.0, "rate_limited": 3.0}
    assert targets[0]["health"] == "up"
