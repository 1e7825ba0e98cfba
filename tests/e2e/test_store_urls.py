"""Store URL schemes behave as docs/configuration.md says: `unix://` is served (a real
redis-server on a Unix socket, admissions and the admin view through it), and the schemes the
loader refuses stop `gateway serve` with one line, no traceback."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from gateway.admission.identity import hash_key
from tests.support.processes import ROOT, gateway, mock_upstream, write_config
from tests.support.redis_server import private_redis
from tests.support.secrets import secret

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

SECRET = secret("store-urls")


def config(upstream: str, store_url: str) -> dict[str, object]:
    return {
        "upstream": {"url": upstream},
        "store": {"url": store_url},
        "keys": [{"id": "k", "sha256": hash_key(SECRET), "plan": "p"}],
        "plans": {"p": {"limits": {"rpm": {"rate": "2/1h"}, "requests": {"concurrency": 2}}}},
        "routes": [{"path": "/**", "limits": ["rpm", "requests"]}],
    }


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with mock_upstream() as url:
        yield url


def test_a_unix_socket_store_is_served(tmp_path: Path, upstream: str) -> None:
    sock = tmp_path / "redis.sock"
    with private_redis("--unixsocket", str(sock), "--unixsocketperm", "700") as server:
        path = write_config(tmp_path / "gw.yaml", config(upstream, f"unix://{sock}?db=3"))
        check = subprocess.run([sys.executable, "-m", "gateway", "check-config", "-c", str(path)],
                               capture_output=True, text=True, cwd=ROOT)
        assert check.returncode == 0, check.stderr
        with gateway(path, ready_path="/readyz") as gw:
            answers = [httpx.get(gw.url + "/", headers={"X-API-Key": SECRET}).status_code for _ in range(3)]
            assert answers == [200, 200, 429]
            view = httpx.get(gw.admin_url + "/v1/keys/k").json()
            assert [b["used"] for b in view["buckets"] if b["kind"] == "rate"] == [2]
        # the counts are in that server's db 3, over the socket
        assert redis.Redis(port=server.port, db=3).dbsize() > 0
        assert "Traceback" not in gw.log()


@pytest.mark.parametrize("url", ["rediss+cluster://127.0.0.1:7000", "rediss+sentinel://127.0.0.1:26379/m",
                                 "unix://localhost/tmp/redis.sock"])
def test_refused_schemes_stop_serve_with_one_line(tmp_path: Path, url: str) -> None:
    path = write_config(tmp_path / "gw.yaml", config("http://127.0.0.1:9", url))
    run = subprocess.run([sys.executable, "-m", "gateway", "serve", "-c", str(path)],
                         capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert run.returncode == 1
    assert run.stderr.count("\n") == 1 and "store.url" in run.stderr and "Traceback" not in run.stderr
