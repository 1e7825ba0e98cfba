"""The test upstream itself: counters, control paths, and the subprocess mode gateways share."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.mock_upstream import ThreadedMockUpstream

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def subprocess_upstream() -> Iterator[str]:
    with subprocess.Popen(
        [sys.executable, "-m", "tests.support.mock_upstream", "--port", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    ) as process:
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            assert line.startswith("listening on 127.0.0.1:"), line
            yield "http://" + line.split()[-1]
        finally:
            process.terminate()
            assert process.wait(5) == 0  # SIGTERM is a clean stop


def test_counters_over_http(subprocess_upstream: str) -> None:
    url = subprocess_upstream
    with httpx.Client(base_url=url) as client:
        assert client.post("/_reset").json() == {"reset": True}
        for key in ("a", "a", "b"):
            client.post("/echo?x=1", content=b"12345", headers={"X-Gateway-Key-Id": key})
        stats = client.get("/_stats").json()["keys"]
        assert stats["a"]["total"] == 2 and stats["b"]["total"] == 1
        assert stats["a"]["in_flight"] == 0 and stats["a"]["max_in_flight"] == 1
        last = stats["a"]["last"]
        assert (last["path"], last["query"], last["body_length"], last["body_complete"]) == (
            "/echo",
            "x=1",
            5,
            True,
        )
        assert ["X-Gateway-Key-Id", "a"] in last["headers"]
        assert (
            stats["a"]["arrivals"] == sorted(stats["a"]["arrivals"]) and len(stats["a"]["arrivals_wall"]) == 2
        )
        client.post("/_reset")
        assert client.get("/_stats").json()["keys"] == {}


def test_hold_counts_in_flight_until_released(subprocess_upstream: str) -> None:
    url = subprocess_upstream
    httpx.post(f"{url}/_reset")
    results: list[int] = []

    def hold() -> None:
        results.append(
            httpx.get(f"{url}/hold?ms=20000", headers={"X-Gateway-Key-Id": "h"}, timeout=10).status_code
        )

    threads = [threading.Thread(target=hold) for _ in range(3)]
    for thread in threads:
        thread.start()
    with httpx.Client(base_url=url) as client:
        for _ in range(200):
            if client.get("/_stats").json()["keys"].get("h", {}).get("in_flight") == 3:
                break
            threading.Event().wait(0.01)
        stats = client.get("/_stats").json()["keys"]["h"]
        assert stats["in_flight"] == 3 and stats["max_in_flight"] == 3
        client.post("/_release")
        for thread in threads:
            thread.join(5)
        assert results == [200, 200, 200]
        assert client.get("/_stats").json()["keys"]["h"]["in_flight"] == 0


def test_threaded_mode_records_disconnects() -> None:
    with ThreadedMockUpstream() as upstream:
        with pytest.raises(httpx.ReadTimeout):
            httpx.get(f"{upstream.url}/delay_headers?ms=5000", headers={"X-Gateway-Key-Id": "d"}, timeout=0.2)
        for _ in range(200):
            if upstream.snapshot()["keys"]["d"]["disconnects"] == 1:
                break
            threading.Event().wait(0.01)
        stats = upstream.snapshot()["keys"]["d"]
        assert stats["disconnects"] == 1 and stats["completed"] == 0 and stats["in_flight"] == 0
