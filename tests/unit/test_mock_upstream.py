"""The test upstream itself: counters, control paths, and the subprocess mode gateways share."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.mock_upstream import Pricing, ThreadedMockUpstream

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


ZENROWS = {
    "rules": [
        {"query": {"js_render": "true", "premium_proxy": "true"}, "cost": 25, "slots": 2},
        {"query": {"js_render": "true"}, "cost": 5, "slots": 2},
        {"query": {"premium_proxy": "true"}, "cost": 10},
        {"method": "POST", "headers": {"X-Tier": "gold"}, "cost": 0},
    ],
    "cost_header": "X-Upstream-Cost",
    "success_only": True,
}


def test_pricing_first_match_declared_cost_and_failures(subprocess_upstream: str) -> None:
    """The mock prices each request by the rules (first match, a repeated parameter matching by
    any value), declares what `declare=` says, fails with `fail=`, and expects the gateway's
    settlement: declared integers up to MAX_COST, anything else the price, non-2xx free."""
    url = subprocess_upstream
    with httpx.Client(base_url=url, headers={"X-Gateway-Key-Id": "p"}) as client:
        client.post("/_reset")
        assert client.post("/_pricing", json=ZENROWS).json() == {"rules": 4}
        answers = [
            client.get("/?js_render=true&premium_proxy=true"),  # 25
            client.get("/?premium_proxy=false&premium_proxy=true"),  # 10: any value of a repeat
            client.get("/?js_render=true&declare=3"),  # 5, settled 3
            client.get("/?declare=2000"),  # 1, held to 1000
            client.get("/?declare=-1"),  # 1: not an integer 0..MAX_COST, the price stands
            client.get("/?js_render=true&fail=500&declare=4"),  # 5, a 500: settled 0
            client.post("/", headers={"X-Tier": "gold"}),  # 0
            client.get("/", headers={"X-Tier": "gold"}),  # 1: the method does not match
            client.get("/?declare=7&declare=9"),  # first value
        ]
        assert [a.status_code for a in answers] == [200] * 5 + [500] + [200] * 3
        assert answers[2].headers["x-upstream-cost"] == "3"
        assert answers[8].headers.get_list("x-upstream-cost") == ["7", "9"]
        assert "x-upstream-cost" not in answers[0].headers
        stats = client.get("/_stats").json()["keys"]["p"]
        assert stats["costs"] == [25, 10, 5, 1, 1, 5, 0, 1, 1]
        assert stats["slots"] == [2, 1, 2, 1, 1, 2, 1, 1, 1]
        assert stats["settled"] == [25, 10, 3, 1000, 1, 0, 0, 1, 7]
        assert (stats["units"], stats["settled_units"]) == (49, 1047)
        days = {time.strftime("%Y-%m-%d", time.gmtime(t)) for t in stats["arrivals_wall"]}
        assert sum(stats["units_by_day"].values()) == 49 and set(stats["units_by_day"]) == days
        client.post("/_reset")  # the pricing outlives a reset of the counters
        client.get("/?js_render=true")
        assert client.get("/_stats").json()["keys"]["p"]["costs"] == [5]
        client.post("/_pricing", json={})


def test_weighted_slots_in_flight() -> None:
    with ThreadedMockUpstream(pricing=Pricing.from_json(ZENROWS)) as upstream:
        threads = [
            threading.Thread(target=httpx.get, args=(f"{upstream.url}/hold?ms=5000{q}",),
                             kwargs={"headers": {"X-Gateway-Key-Id": "w"}, "timeout": 10})
            for q in ("&js_render=true", "&js_render=true", "")
        ]
        for thread in threads:
            thread.start()
        for _ in range(300):
            if upstream.snapshot()["keys"].get("w", {}).get("in_flight") == 3:
                break
            threading.Event().wait(0.01)
        stats = upstream.snapshot()["keys"]["w"]
        assert (stats["in_flight"], stats["slots_in_flight"], stats["max_slots_in_flight"]) == (3, 5, 5)
        upstream.release()
        for thread in threads:
            thread.join(5)
        stats = upstream.snapshot()["keys"]["w"]
        assert (stats["slots_in_flight"], stats["max_slots_in_flight"]) == (0, 5)
