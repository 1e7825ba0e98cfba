"""IP bans against real `gateway serve` processes and the mock upstream.

Loopback gives distinct client addresses: 127.0.0.2 is the trusted proxy, 127.0.0.3 and up
are clients that connect directly (httpx `local_address`); IPv6 clients come through the
trusted proxy as X-Forwarded-For values. Durations are short (ban 2 s, doubling, strikes 5
within 2 s) so the escalation sequence fits in seconds. The configs never allowlist
127.0.0.0/8 (the example configs do)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest

from gateway.admission.bans import FIRST_BURST
from gateway.admission.identity import hash_key
from tests.support.processes import Proc, gateway, mock_upstream, write_config
from tests.support.secrets import secret

pytestmark = pytest.mark.e2e

KEY = secret("bans-good")
TIGHT = secret("bans-tight")
PROXY = "127.0.0.2"
ADMIN = {"Authorization": "Bearer adm-token"}
BAD = {"X-API-Key": secret("bans-bad")}
GOOD = {"X-API-Key": KEY}


def config(upstream: str, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "upstream": {"url": upstream, "timeout": "5s"},
        "admin_token": "adm-token",
        "identity": {"trusted_proxies": [f"{PROXY}/32"]},
        "keys": [
            {"id": "good", "sha256": hash_key(KEY), "plan": "big"},
            {"id": "tight", "sha256": hash_key(TIGHT), "plan": "tight"},
        ],
        "plans": {
            "big": {"limits": {"rpm": {"rate": "100000/1m"}}},
            "tight": {"limits": {"rpm": {"rate": "2/1m"}}},
        },
        # Only /v1/** is proxied: a keyed request elsewhere is a 404, which neither strikes
        # nor reaches the upstream, so it can probe whether an address is banned.
        "routes": [{"path": "/v1/**", "limits": ["rpm"]}],
        "bans": {
            "strikes": 5, "within": "2s", "duration": "2s", "factor": 2, "max_duration": "8s",
            "remember": "1m", "allow": ["127.0.0.5/32"], "ipv6_prefix": 64, "tolerance": 2,
        },
    }
    cfg.update(extra)
    return cfg


def client(source: str) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(local_address=source), timeout=5)


def via_proxy(xff: str, headers: dict[str, str] | None = None) -> dict[str, str]:
    return {"X-Forwarded-For": xff, **(headers or {})}


def upstream_total(upstream: str) -> int:
    keys = httpx.get(upstream + "/_stats").json()["keys"]
    return sum(stats["total"] for stats in keys.values())


def bans(gw: Proc) -> dict[str, dict[str, Any]]:
    response = httpx.get(gw.admin_url + "/v1/bans", headers=ADMIN)
    assert response.status_code == 200, response.text
    return {entry["ip"]: entry for entry in response.json()}


def metric(gw: Proc, line_prefix: str) -> float:
    text = httpx.get(gw.admin_url + "/metrics", headers=ADMIN).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_prefix))


def assert_banned(response: httpx.Response, expected_retry: int | None = None) -> int:
    assert response.status_code == 403, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["success"] is False and body["error"] == "ip_banned" and body["message"]
    retry = int(response.headers["retry-after"])
    assert body["retryAfterSeconds"] == retry >= 1
    if expected_retry is not None:
        assert retry == expected_retry
    return retry


def strike_until_banned(
    http: httpx.Client, gw: Proc, headers: dict[str, str], limit: int = 12
) -> tuple[int, httpx.Response]:
    """Send refused requests until the gateway answers 403; returns (refusals seen, the 403)."""
    refused = 0
    for _ in range(limit):
        response = http.get(gw.url + "/v1/x", headers=headers)
        if response.status_code == 403:
            return refused, response
        assert response.status_code in (401, 429), response.text
        refused += 1
    pytest.fail(f"not banned after {limit} refusals")


def status(http: httpx.Client, gw: Proc, path: str, headers: dict[str, str]) -> int:
    return http.get(gw.url + path, headers=headers).status_code


def wait_until(predicate: Any, timeout: float, step: float = 0.05) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(step)
    pytest.fail(f"condition not met within {timeout}s")


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with mock_upstream() as url:
        yield url


@pytest.fixture(scope="module")
def gw(upstream: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    path = write_config(tmp_path_factory.mktemp("bans") / "gw.yaml", config(upstream))
    with gateway(path) as proc:
        yield proc


def test_spoofed_xff_from_an_untrusted_peer_is_ignored(gw: Proc, upstream: str) -> None:
    with client("127.0.0.3") as attacker, client(PROXY) as proxy:
        # the attacker claims to be someone else each time: it cannot evade, nor frame them
        refused = 0
        for i in range(5):
            response = attacker.get(gw.url + "/v1/x", headers=via_proxy(f"198.51.100.{i + 1}", BAD))
            assert response.status_code == 401
            refused += 1
        response = attacker.get(gw.url + "/v1/x", headers=via_proxy("198.51.100.99", GOOD))
        wait_until(lambda: attacker.get(gw.url + "/nope", headers=GOOD).status_code == 403, 2)
        assert_banned(attacker.get(gw.url + "/v1/x", headers=via_proxy("198.51.100.50", GOOD)))
        # the people it named are not banned: through the trusted proxy they pass
        before = upstream_total(upstream)
        for i in range(5):
            response = proxy.get(gw.url + "/v1/x", headers=via_proxy(f"198.51.100.{i + 1}", GOOD))
            assert response.status_code == 200
        assert upstream_total(upstream) == before + 5
    listed = bans(gw)
    assert "127.0.0.3" in listed
    assert not any(ip.startswith("198.51.100.") for ip in listed)
    log = [json.loads(line) for line in gw.log().splitlines() if line.startswith("{")]
    assert any(entry.get("client") == "198.51.100.1" and entry["status"] == 200 for entry in log)
    assert any(entry.get("client") == "127.0.0.3" and entry["status"] == 403 for entry in log)


def test_through_the_trusted_proxy_the_client_is_banned(gw: Proc, upstream: str) -> None:
    with client(PROXY) as proxy:
        # a client-supplied hop on the left, the proxy's own hop on the right: the rightmost wins
        refused, banned = strike_until_banned(proxy, gw, via_proxy("6.6.6.6, 203.0.113.7", BAD))
        assert 5 <= refused <= 6
        assert_banned(banned, 2)
        before = upstream_total(upstream)
        assert_banned(proxy.get(gw.url + "/v1/x", headers=via_proxy("203.0.113.7", GOOD)))
        assert upstream_total(upstream) == before  # a banned request never reaches the upstream
        assert proxy.get(gw.url + "/v1/x", headers=via_proxy("203.0.113.8", GOOD)).status_code == 200
        assert proxy.get(gw.url + "/v1/x", headers=GOOD).status_code == 200  # the proxy itself is fine
        # a garbage hop falls back to the peer: the proxy itself, which is not banned
        assert proxy.get(gw.url + "/v1/x", headers=via_proxy("203.0.113.7, garbage", GOOD)).status_code == 200
    listed = bans(gw)
    assert "203.0.113.7" in listed and "6.6.6.6" not in listed and PROXY not in listed


def test_429s_that_come_back_early_are_strikes(gw: Proc) -> None:
    """`tolerance: 2`: two refusals told to wait a minute may be two threads; from the third
    on, each one that comes back before its wait is a strike, and the 5th strike bans. (Past
    the first half second of the refusals: a first burst is never early, FIRST_BURST.)"""
    before = {kind: metric(gw, f'gateway_ban_strikes_total{{kind="{kind}"}}') for kind in ("rate", "unauthorized")}
    with client("127.0.0.8") as http:
        statuses = [http.get(gw.url + "/v1/x", headers={"X-API-Key": TIGHT}).status_code for _ in range(3)]
        assert statuses == [200, 200, 429]  # the first refusal: its streak begins
        time.sleep(FIRST_BURST)
        refused, banned = strike_until_banned(http, gw, {"X-API-Key": TIGHT})
        assert 1 + refused == 2 + 5
        assert_banned(banned)
    assert bans(gw)["127.0.0.8"]["strikes"] == {"unauthorized": 0, "rate": 5, "concurrency": 0}
    assert metric(gw, 'gateway_ban_strikes_total{kind="rate"}') - before["rate"] == 5
    assert metric(gw, 'gateway_ban_strikes_total{kind="unauthorized"}') == before["unauthorized"]


def test_bans_escalate_2_4_8_seconds(gw: Proc) -> None:
    with client("127.0.0.4") as http:
        for expected in (2, 4, 8):
            refused, banned = strike_until_banned(http, gw, BAD)
            assert 5 <= refused <= 6
            assert_banned(banned, expected)
            entry = bans(gw)["127.0.0.4"]
            assert entry["seconds_left"] == expected
            assert entry["ban_count"] == expected.bit_length() - 1
            assert abs(entry["until"] - (time.time() + expected)) < 1.0
            if expected < 8:
                # refused for the whole ban, then let through again
                time.sleep(expected - 0.5)
                assert_banned(http.get(gw.url + "/nope", headers=GOOD), 1)
                wait_until(lambda: http.get(gw.url + "/nope", headers=GOOD).status_code == 404, 1.5)


def test_allowlisted_ip_is_never_banned(gw: Proc) -> None:
    with client("127.0.0.5") as allowed, client("127.0.0.6") as other:
        for _ in range(20):
            assert allowed.get(gw.url + "/v1/x", headers=BAD).status_code == 401
        time.sleep(0.2)
        assert allowed.get(gw.url + "/v1/x", headers=GOOD).status_code == 200
        strike_until_banned(other, gw, BAD)  # same config, not allowlisted
    listed = bans(gw)
    assert "127.0.0.5" not in listed and "127.0.0.6" in listed


def test_ipv6_clients_are_banned_by_64_prefix(gw: Proc) -> None:
    with client(PROXY) as proxy:
        for i in range(5):  # five different addresses, one /64
            assert status(proxy, gw, "/v1/x", via_proxy(f"2001:db8:a::{i + 1:x}", BAD)) == 401
        wait_until(lambda: status(proxy, gw, "/nope", via_proxy("2001:db8:a::ffff", GOOD)) == 403, 2)
        assert_banned(proxy.get(gw.url + "/v1/x", headers=via_proxy("[2001:db8:a:0:1:2:3:4]:443", GOOD)))
        assert proxy.get(gw.url + "/v1/x", headers=via_proxy("2001:db8:b::1", GOOD)).status_code == 200
        assert proxy.get(gw.url + "/v1/x", headers=via_proxy("2001:db8:a:1::1", GOOD)).status_code == 200
        # IPv4-mapped addresses are their IPv4 address, not one shared /64
        for _ in range(5):
            assert proxy.get(gw.url + "/v1/x", headers=via_proxy("::ffff:192.0.2.1", BAD)).status_code == 401
        wait_until(lambda: status(proxy, gw, "/nope", via_proxy("192.0.2.1", GOOD)) == 403, 2)
        assert proxy.get(gw.url + "/v1/x", headers=via_proxy("::ffff:192.0.2.2", GOOD)).status_code == 200
        listed = bans(gw)
        assert "2001:db8:a::/64" in listed and "192.0.2.1" in listed
        # an admin may name any address inside the banned prefix
        lifted = httpx.delete(gw.admin_url + "/v1/bans/2001:db8:a::1234", headers=ADMIN)
        assert lifted.status_code == 200 and lifted.json()["ip"] == "2001:db8:a::/64"
        assert proxy.get(gw.url + "/v1/x", headers=via_proxy("2001:db8:a::ffff", GOOD)).status_code == 200


def test_a_flood_of_invalid_keys_is_banned_and_never_reaches_the_upstream(gw: Proc, upstream: str) -> None:
    before_upstream = upstream_total(upstream)
    before_bans = metric(gw, "gateway_bans_total")
    before_banned = metric(gw, 'gateway_requests_total{outcome="ip_banned"')

    async def flood() -> list[int]:
        connector = aiohttp.TCPConnector(local_addr=("127.0.0.7", 0), limit=20)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def one() -> int:
                async with session.get(gw.url + "/v1/x", headers=BAD) as response:
                    await response.read()
                    return response.status

            return list(await asyncio.gather(*(one() for _ in range(300))))

    statuses = asyncio.run(flood())
    assert set(statuses) == {401, 403}
    assert statuses.count(401) == 5  # exactly `strikes`: the request after the 5th waits for its verdict
    # a banned client with a valid key is refused too, and the upstream saw nothing at all
    with client("127.0.0.7") as http:
        assert_banned(http.get(gw.url + "/v1/x", headers=GOOD))
    assert upstream_total(upstream) == before_upstream
    assert metric(gw, "gateway_bans_total") == before_bans + 1
    assert metric(gw, 'gateway_requests_total{outcome="ip_banned"') - before_banned == statuses.count(403) + 1
    assert metric(gw, "gateway_banned_ips") >= 1


def test_a_browsers_cors_preflights_are_no_strikes(gw: Proc) -> None:
    """A browser sends an OPTIONS preflight before a request with `X-API-Key`, and by the Fetch
    standard without that header: each got a 401 and a strike, so a page making a dozen calls
    banned its whole address (an office behind one NAT). Preflights now get the 401 alone; the
    same OPTIONS without its CORS headers is still a strike."""
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "GET",
                 "Access-Control-Request-Headers": "x-api-key"}
    before = metric(gw, 'gateway_ban_strikes_total{kind="unauthorized"')
    with client("127.0.0.30") as http:
        for _ in range(15):  # three times `strikes`
            response = http.options(gw.url + "/v1/x", headers=preflight)
            assert response.status_code == 401 and response.json()["error"] == "missing_api_key"
        assert http.get(gw.url + "/v1/x", headers=GOOD).status_code == 200
        assert metric(gw, 'gateway_ban_strikes_total{kind="unauthorized"') == before
        statuses = [http.options(gw.url + "/v1/x", headers={"Origin": "https://app.example"}).status_code
                    for _ in range(6)]
        assert statuses[:5] == [401] * 5 and statuses[5] == 403  # a plain OPTIONS strikes


def test_admin_lists_and_lifts_bans(gw: Proc) -> None:
    assert httpx.get(gw.admin_url + "/v1/bans").status_code == 401
    assert httpx.delete(gw.admin_url + "/v1/bans/127.0.0.9").status_code == 401
    missing = httpx.delete(gw.admin_url + "/v1/bans/127.0.0.9", headers=ADMIN)
    assert missing.status_code == 404 and missing.json()["error"] == "not_banned"
    bad = httpx.delete(gw.admin_url + "/v1/bans/not-an-ip", headers=ADMIN)
    assert bad.status_code == 400 and bad.json()["error"] == "bad_ip"
    with client("127.0.0.9") as http:
        strike_until_banned(http, gw, BAD)
        entry = bans(gw)["127.0.0.9"]
        assert entry == {"ip": "127.0.0.9", "seconds_left": 2, "until": entry["until"], "ban_count": 1,
                         "strikes": {"unauthorized": 5, "rate": 0, "concurrency": 0}}
        lifted = httpx.delete(gw.admin_url + "/v1/bans/127.0.0.9", headers=ADMIN)
        assert lifted.status_code == 200
        assert lifted.json() == {"success": True, "ip": "127.0.0.9", "lifted": True}
        assert http.get(gw.url + "/v1/x", headers=GOOD).status_code == 200  # at once on this replica
        assert "127.0.0.9" not in bans(gw)
        # lifting pardons: the next ban starts from the first duration again
        _, banned = strike_until_banned(http, gw, BAD)
        assert_banned(banned, 2)


@pytest.mark.redis
def test_bans_are_shared_by_two_gateways(tmp_path: Path, upstream: str, redis_url: str) -> None:
    cfg = config(upstream, store={"url": redis_url, "prefix": "gwbans", "timeout": "500ms"})
    # bans that outlast the test
    cfg["bans"] = {**cfg["bans"], "within": "10s", "duration": "20s", "max_duration": "1m"}
    path = write_config(tmp_path / "gw.yaml", cfg)
    with gateway(path) as a, gateway(path) as b, client("127.0.0.3") as http, client("127.0.0.4") as other:
        # strikes add up across replicas: 3 on a and 2 on b make 5
        for target in (a, b, a, b, a):
            assert http.get(target.url + "/v1/x", headers=BAD).status_code == 401
        wait_until(lambda: http.get(a.url + "/nope", headers=GOOD).status_code == 403
                   and http.get(b.url + "/nope", headers=GOOD).status_code == 403, 3)
        # a ban imposed on a reaches b through the store's index, within one sync interval
        before = upstream_total(upstream)
        strike_until_banned(other, a, BAD)
        learned = wait_until(lambda: other.get(b.url + "/nope", headers=GOOD).status_code == 403, 3, 0.02)
        assert learned < 1.5
        assert_banned(other.get(b.url + "/v1/x", headers=GOOD))
        assert upstream_total(upstream) == before
        assert set(bans(a)) == set(bans(b)) == {"127.0.0.3", "127.0.0.4"}
        assert metric(b, "gateway_banned_ips") == 2
        assert metric(a, "gateway_bans_total") + metric(b, "gateway_bans_total") == 2
        # lifted through b: a learns at its next sync
        assert httpx.delete(b.admin_url + "/v1/bans/127.0.0.4", headers=ADMIN).status_code == 200
        assert other.get(b.url + "/v1/x", headers=GOOD).status_code == 200
        wait_until(lambda: other.get(a.url + "/nope", headers=GOOD).status_code == 404, 3, 0.02)
        assert set(bans(a)) == {"127.0.0.3"}


def test_key_view_tells_whether_its_recent_clients_are_banned(gw: Proc) -> None:
    with client(PROXY) as proxy:
        # the key was used from two clients; then one of them gets itself banned
        assert proxy.get(gw.url + "/v1/x", headers=via_proxy("198.51.100.1", GOOD)).status_code == 200
        assert proxy.get(gw.url + "/v1/x", headers=via_proxy("198.51.100.2", GOOD)).status_code == 200
        strike_until_banned(proxy, gw, via_proxy("198.51.100.2", BAD))
    view = httpx.get(gw.admin_url + "/v1/keys/good", headers=ADMIN).json()
    recent = {entry["ip"]: entry for entry in view["recent_clients"]}
    assert recent["198.51.100.1"]["banned"] is False
    assert recent["198.51.100.2"]["banned"] is True and recent["198.51.100.2"]["ban_seconds_left"] >= 1
