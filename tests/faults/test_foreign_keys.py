"""A key under the gateway's prefix that holds another type (another program sharing the
prefix, a hand edit): the store answers that key's admissions with an error (`WRONGTYPE`), and
only that key's requests are decided by `on_error`. Before, the error counted as a store
failure: three of them opened the breaker, and every key of every client got `503
store_unavailable` (under `deny`) or local limits (under `local`) while the store was fine.
Nor is the admission's undo sent again at every flush: it would fail the same way each time."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.faults.conftest import BIG_KEY, PREFIX, SMALL_KEY, fault_config, gateway_for, get, readyz
from tests.support.processes import Proc
from tests.support.redis_server import PrivateRedis, private_redis

pytestmark = [pytest.mark.redis, pytest.mark.e2e]


@pytest.fixture
def redis_server() -> Iterator[PrivateRedis]:
    with private_redis() as server:
        yield server


def metric(proc: Proc, line: str) -> float:
    text = httpx.get(proc.admin_url + "/metrics", timeout=5).text
    found = re.search(re.escape(line) + r" ([0-9.e+]+)", text)
    return float(found.group(1)) if found else 0.0


@pytest.mark.parametrize("on_error", ["deny", "local"])
def test_a_key_of_another_type_fails_only_its_own_requests(
    on_error: str, tmp_path: Path, upstream: str, redis_server: PrivateRedis
) -> None:
    with gateway_for(tmp_path, fault_config(upstream, redis_server.url, on_error=on_error)) as gw:
        assert get(gw, SMALL_KEY).status_code == 200  # its rate log now exists in Redis
        with redis_server.client() as client:
            (rate_log,) = [name for name in client.scan_iter(match=f"{PREFIX}:*:r:rpm")]
            client.delete(rate_log)
            client.set(rate_log, "another program's value")

        small: list[int] = []
        big: list[int] = []
        for _ in range(3):  # the bad key's requests in a row, twice the breaker's threshold each time
            small += [get(gw, SMALL_KEY).status_code for _ in range(6)]
            big += [get(gw, BIG_KEY).status_code for _ in range(3)]
        assert big == [200] * 9, (small, big)  # every other key goes through the store as before
        if on_error == "deny":
            assert small == [503] * 18, small  # that key cannot be decided: store_unavailable
            response = get(gw, SMALL_KEY)
            assert response.json()["error"] == "store_unavailable" and response.headers["retry-after"] == "1"
        else:
            # decided locally: the plan's 6/10s at this one replica (local_divisor 1)
            assert small[:6] == [200] * 6 and set(small[6:]) == {429}, small
        # only the bad key's requests were decided without the store, and the breaker never opened
        decided = 19 if on_error == "deny" else 18
        assert metric(gw, f'gateway_store_fallback_decisions_total{{mode="{on_error}"}}') == decided
        status, body = readyz(gw)
        assert status == 200 and body["breaker"] == "closed", body
        rejected = metric(gw, 'gateway_store_errors_total{operation="admit"}')
        assert rejected == decided
        time.sleep(0.3)  # undos flush after the next admissions; each failed undo is dropped, not re-sent
        for _ in range(5):
            assert get(gw, BIG_KEY).status_code == 200
        undo_failures = metric(gw, 'gateway_store_errors_total{operation="release"}')
        assert undo_failures <= rejected, (undo_failures, rejected)
    warnings = [line for line in gw.log().splitlines() if "could not decide an admission" in line]
    assert len(warnings) == 1, warnings  # one line per 10 s, not one per request
