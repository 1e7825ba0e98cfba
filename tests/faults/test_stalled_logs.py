"""A gateway whose stdout and stderr nobody reads (a pipe left undrained, docker's blocking log
driver with a stalled backend): requests and the admin port must go on, and the lines must
arrive once the reader reads again (gateway/log_writer.py).

Before: the access log's write blocked the event loop once the 64 KiB pipe was full, after ~350
requests: every request, `/healthz` included, hung, and SIGTERM was never handled.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.faults.conftest import BIG_KEY, fault_config
from tests.support.processes import ROOT, write_config
from tests.support.redis_server import free_port, private_redis

pytestmark = [pytest.mark.redis, pytest.mark.e2e]

REQUESTS = 1500  # ~400 KB of access log: six times a pipe's buffer


@pytest.fixture
def redis_url() -> Iterator[str]:
    with private_redis() as server:
        yield server.url


def test_a_gateway_whose_log_pipes_nobody_reads_goes_on_serving_and_writes_them_later(
    tmp_path: Path, upstream: str, redis_url: str
) -> None:
    port, admin_port = free_port(), free_port()
    while admin_port == port:  # the kernel may hand the port just released out again
        admin_port = free_port()
    config = write_config(tmp_path / "gw.yaml", fault_config(upstream, redis_url))
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "-c", str(config),
         "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin_port}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=os.environ.copy(),
    )
    try:
        deadline = time.monotonic() + 30
        while True:  # up: nothing of its pipes is read meanwhile
            try:
                if httpx.get(f"http://127.0.0.1:{admin_port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.05)

        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"X-API-Key": BIG_KEY}, timeout=5) as client:
            statuses = [client.get(f"/echo?n={n}&pad={'x' * 200}").status_code for n in range(REQUESTS)]
        assert statuses == [200] * REQUESTS
        assert httpx.get(f"http://127.0.0.1:{admin_port}/healthz", timeout=5).status_code == 200
        metrics = httpx.get(f"http://127.0.0.1:{admin_port}/metrics", timeout=5).text
        assert 'gateway_log_lines_dropped_total{stream="stdout"} 0.0' in metrics

        process.send_signal(signal.SIGTERM)  # handled, although the pipes are still full
        stdout, stderr = process.communicate(timeout=30)  # reading again: everything arrives
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0
    lines = [json.loads(line) for line in stdout.decode().splitlines()]
    assert [line["status"] for line in lines] == [200] * REQUESTS  # every access line, in order
    assert b"stopped (exit code 0)" in stderr
