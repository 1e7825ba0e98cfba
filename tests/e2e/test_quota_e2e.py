"""Period quotas and the usage path end to end (issue 18), two gateway processes on one Redis.

- A spent quota answers 402 quota_exceeded with Retry-After = seconds to the end of the UTC
  day, on both processes; `POST /v1/keys/{id}/quota {"grant": N}` on one process lets exactly
  N more units through, over both (a refusal either process cached must not outlive the grant);
  `{"reset": true}` starts the period again.
- The usage path answers the numbers the last answer's headers gave, is never forwarded, never
  counted, and wants the caller's key.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.admission.controller import QUOTA_REFUSAL_TTL
from tests.support.credits import (
    admin_bucket,
    credit_config,
    ietf_items,
    key_entry,
    path_for,
    seconds_to_utc_midnight,
    set_pricing,
)
from tests.support.processes import gateway, mock_upstream, write_config
from tests.support.secrets import secret

pytestmark = [pytest.mark.redis, pytest.mark.e2e]

PREFIX = "gwquota"
QUOTA = 30
TOKEN = secret("quota-admin-token")
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


def _config(upstream: str, redis_url: str) -> dict[str, Any]:
    config = credit_config(
        upstream, redis_url, prefix=PREFIX,
        keys=[key_entry("trial", "trial"), key_entry("bystander", "trial"), key_entry("usage", "trial")],
        plans={"trial": {"limits": {
            "credits": {"rate": "100/1m", "counts": "cost"},
            "daily": {"quota": f"{QUOTA}/1d"},
            "browsers": {"concurrency": 4},
        }}},
        limits=["credits", "daily", "browsers"],
    )
    config["admin_token"] = TOKEN
    return config


def _get(url: str, key_id: str, cost: int = 1, **kwargs: Any) -> httpx.Response:
    sent = time.time()
    answer = httpx.get(url + path_for(cost), headers={"X-API-Key": secret(key_id)}, timeout=10, **kwargs)
    answer.extensions["sent_wall"] = sent  # the clock before the gateway could decide anything
    return answer


def _daily_used(admin_url: str, key_id: str = "trial") -> int:
    return int(admin_bucket(admin_url, key_id, "daily", TOKEN)["used"])


def _assert_quota_refusal(answer: httpx.Response) -> None:
    assert answer.status_code == 402, answer.text
    body = answer.json()
    assert body["error"] == "quota_exceeded" and body["success"] is False, body
    # Read at the request's sending, which precedes its decision: a clock read after the answer
    # ran late by the exchange, enough to push a rounded-up Retry-After past `+ 1` (CI: 21,677
    # against 21,675.9988 read after the answer).
    to_midnight = seconds_to_utc_midnight(answer.extensions["sent_wall"])
    # Retry-After is the period's end, rounded up to whole seconds
    assert to_midnight - 1 <= int(answer.headers["retry-after"]) <= to_midnight + 1, answer.headers
    assert answer.headers["x-ratelimit-remaining"] == "0"
    daily = ietf_items(answer.headers["ratelimit"])["daily"]
    assert daily["r"] == "0" and abs(int(daily["t"]) - to_midnight) <= 1, daily
    assert ietf_items(answer.headers["ratelimit-policy"])["daily"]["q"] == str(QUOTA)


def test_spent_quota_402_then_a_grant_over_both_gateways(tmp_path: Path, redis_url: str) -> None:
    if seconds_to_utc_midnight() < 60:
        pytest.skip("the UTC day ends during the run")
    with mock_upstream() as upstream:
        set_pricing(upstream)
        config = write_config(tmp_path / "gw.yaml", _config(upstream, redis_url))
        with gateway(config) as a, gateway(config) as b:
            # 30 units over both processes: 10 + 10 + 5 + 5
            for url, cost in ((a.url, 10), (b.url, 10), (a.url, 5), (b.url, 5)):
                assert _get(url, "trial", cost).status_code == 200
            for url in (a.url, b.url, a.url, b.url):  # spent: refused on both, cached or not
                _assert_quota_refusal(_get(url, "trial"))
            assert _get(a.url, "bystander", 25).status_code == 200  # per key

            assert httpx.post(f"{a.admin_url}/v1/keys/trial/quota", json={"grant": 11}).status_code == 401
            granted = httpx.post(f"{a.admin_url}/v1/keys/trial/quota", json={"grant": 11}, headers=ADMIN)
            assert granted.status_code == 200, granted.text
            (daily,) = granted.json()["quotas"]
            assert (daily["used"], daily["granted"], daily["remaining"]) == (QUOTA, 11, 11), daily
            # A refusal either process cached lasts QUOTA_REFUSAL_TTL at most; then exactly 11
            # more units, alternating processes (B never saw the grant call)
            time.sleep(QUOTA_REFUSAL_TTL + 0.05)
            answers = [_get((b.url, a.url)[i % 2], "trial").status_code for i in range(13)]
            assert answers == [200] * 11 + [402] * 2, answers
            assert _daily_used(a.admin_url) == _daily_used(b.admin_url) == QUOTA + 11

            reset = httpx.post(f"{b.admin_url}/v1/keys/trial/quota", json={"reset": True}, headers=ADMIN)
            assert reset.status_code == 200, reset.text
            time.sleep(QUOTA_REFUSAL_TTL + 0.05)
            assert _get(a.url, "trial", 25).status_code == 200
            assert _get(b.url, "trial", 5).status_code == 200
            _assert_quota_refusal(_get(a.url, "trial"))
            assert _daily_used(b.admin_url) == QUOTA
            stats = httpx.get(upstream + "/_stats").json()["keys"]
    # the upstream saw exactly the units admitted: 30, 11 granted, 30 after the reset
    assert stats["trial"]["units"] == QUOTA + 11 + QUOTA


def test_a_grant_is_served_at_once_by_the_process_that_granted_it(tmp_path: Path, redis_url: str) -> None:
    """The admin answer says `remaining: 1`; the same process must not then refuse from a
    refusal it cached before the grant (RefusalCache: "grants can end it sooner")."""
    with mock_upstream() as upstream:
        set_pricing(upstream)
        config = write_config(tmp_path / "gw.yaml", _config(upstream, redis_url))
        with gateway(config) as a:
            assert _get(a.url, "trial", 25).status_code == 200
            assert _get(a.url, "trial", 5).status_code == 200
            _assert_quota_refusal(_get(a.url, "trial"))
            granted = httpx.post(f"{a.admin_url}/v1/keys/trial/quota", json={"grant": 1}, headers=ADMIN)
            assert granted.json()["quotas"][0]["remaining"] == 1
            after = _get(a.url, "trial")
    assert after.status_code == 200, after.text


def test_quota_admin_rejects_bad_bodies(tmp_path: Path, redis_url: str) -> None:
    with mock_upstream() as upstream:
        config = write_config(tmp_path / "gw.yaml", _config(upstream, redis_url))
        with gateway(config) as a:
            url = f"{a.admin_url}/v1/keys/trial/quota"
            for bad in ({"grant": -5}, {"grant": "ten"}, {}, {"grant": 10**12}, {"limit": "credits", "grant": 1}):
                answer = httpx.post(url, json=bad, headers=ADMIN)
                assert 400 <= answer.status_code < 500, (bad, answer.status_code, answer.text)
            unknown = httpx.post(f"{a.admin_url}/v1/keys/nobody/quota", json={"grant": 1}, headers=ADMIN)
            assert unknown.status_code == 404
            assert _daily_used(a.admin_url) == 0  # nothing was granted or spent


def test_usage_path_says_what_the_headers_say(tmp_path: Path, redis_url: str) -> None:
    with mock_upstream() as upstream:
        set_pricing(upstream)
        config = write_config(tmp_path / "gw.yaml", _config(upstream, redis_url))
        with gateway(config) as a, gateway(config) as b:
            assert httpx.get(a.url + "/v1/usage").status_code == 401
            assert httpx.get(a.url + "/v1/usage", headers={"X-API-Key": "not-a-key"}).status_code == 401
            last = _get(a.url, "usage", 5)
            assert last.status_code == 200
            items = ietf_items(last.headers["ratelimit"])
            own_key = {"X-API-Key": secret("usage")}
            usage = [httpx.get(url + "/v1/usage", headers=own_key) for url in (a.url, b.url)]
            again = httpx.get(a.url + "/v1/usage", headers=own_key)
            to_midnight = seconds_to_utc_midnight()
            stats = httpx.get(upstream + "/_stats").json()["keys"]
    assert stats["usage"]["total"] == 1  # the usage path was never forwarded
    assert "-" not in stats
    for answer in (*usage, again):
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert (body["key"], body["plan"]) == ("usage", "trial")
        limits = {item["name"]: item for item in body["limits"]}
        assert set(limits) == {"credits", "daily", "browsers"}
        credits, daily, browsers = limits["credits"], limits["daily"], limits["browsers"]
        assert (credits["kind"], credits["limit"], credits["window"], credits["counts"]) == ("rate", 100, 60, "cost")
        assert (credits["used"], credits["remaining"]) == (5, int(items["credits"]["r"])) == (5, 95)
        assert abs(credits["reset"] - int(items["credits"]["t"])) <= 1
        assert (daily["kind"], daily["limit"], daily["period"]) == ("quota", QUOTA, "1d")
        assert (daily["used"], daily["remaining"]) == (5, int(items["daily"]["r"])) == (5, QUOTA - 5)
        assert abs(daily["reset"] - to_midnight) <= 2
        assert (browsers["kind"], browsers["limit"], browsers["used"], browsers["remaining"]) == (
            "concurrency", 4, 0, 4)
