"""The closed admin port (issue 15): no non-loopback admin port without a token (or the explicit
opt-out), a Host check against DNS rebinding, tokens compared in constant time, probes open."""

from __future__ import annotations

import asyncio
import hmac

import httpx
import pytest

from gateway.admin import create_admin_app
from gateway.admin.exposure import host_allowed
from gateway.config.loader import ConfigError, load_config_text
from gateway.config.model import Config
from gateway.state import GatewayState
from tests.support.config_texts import minimal_config

MINIMAL = minimal_config()

# -- where the admin port may listen -------------------------------------------------------------


@pytest.mark.parametrize("address", ["0.0.0.0:9464", "[::]:9464", "10.1.2.3:9464", "admin.internal:9464"])
def test_a_non_loopback_admin_port_without_a_token_is_refused(address: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config_text(MINIMAL + f"admin_listen: '{address}'\n", "t.yaml")
    assert caught.value.problems == [
        f"t.yaml:14: admin_listen: {address} is reachable beyond this machine and admin_token is not set:"
        " set admin_token, listen on 127.0.0.1, or set admin_open: true if a firewall guards the port"
    ]


def test_the_refusal_names_an_override_too() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config_text(MINIMAL, "t.yaml", overrides={"admin_listen": "0.0.0.0:9464"})
    assert caught.value.problems[0].startswith("t.yaml:override: admin_listen: 0.0.0.0:9464 is reachable")


@pytest.mark.parametrize(
    "extra",
    [
        "admin_listen: 127.0.0.1:9464\n",
        "admin_listen: 127.0.0.2:9464\n",
        "admin_listen: '[::1]:9464'\n",
        "admin_listen: localhost:9464\n",
        "admin_listen: 0.0.0.0:9464\nadmin_token: s3cret-token\n",
        "admin_listen: 0.0.0.0:9464\nadmin_open: true\n",
    ],
)
def test_loopback_a_token_or_the_opt_out_may_start(extra: str) -> None:
    load_config_text(MINIMAL + extra, "t.yaml")


def test_admin_hosts_are_checked() -> None:
    config = load_config_text(MINIMAL + "admin_hosts: [Gateway, 'localhost:19464', '[::1]:9']\n", "t.yaml")
    assert config.admin_hosts == ("gateway", "localhost:19464", "[::1]:9")
    with pytest.raises(ConfigError) as caught:
        load_config_text(MINIMAL + "admin_hosts: ['a b', 'x:99999', '::1']\n", "t.yaml")
    assert caught.value.problems == [
        f't.yaml:14: admin_hosts[{i}]: "{value}" is not a host name, HOST:PORT or [IPv6]:PORT'
        for i, value in enumerate(["a b", "x:99999", "::1"])
    ]


# -- which Host the admin API answers ------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("127.0.0.1:9464", True),
        ("localhost:9464", True),
        ("LOCALHOST", True),
        ("[::1]:9464", True),
        ("10.0.0.7:9464", True),  # Prometheus scraping the pod IP: an IP literal cannot be rebound
        ("admin.internal:9464", True),  # the admin_listen host
        ("gateway:9464", True),  # an admin_hosts entry without a port: this port
        ("localhost:19464", True),  # an admin_hosts entry with its own port
        ("evil.example", False),
        ("evil.example:9464", False),
        ("127.0.0.1.nip.io:9464", False),
        ("127.0.0.1:9465", False),  # another port
        ("gateway:9465", False),
        ("", False),
        ("127.0.0.1:9464:1", False),
        ("[::1", False),
        (None, False),
    ],
)
def test_host_allowed(host: str | None, allowed: bool) -> None:
    assert host_allowed(host, 9464, "admin.internal", ("gateway", "localhost:19464")) is allowed


# -- the admin app -------------------------------------------------------------------------------


def admin_config(**extra: object) -> Config:
    text = MINIMAL + "".join(f"{name}: {value}\n" for name, value in extra.items())
    return load_config_text(text, "t.yaml")


async def admin_get(config: Config, path: str, host: str, headers: dict[str, str] | None = None) -> httpx.Response:
    state = GatewayState.create(config)
    transport = httpx.ASGITransport(app=create_admin_app(state))  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:9464") as client:
        return await client.get(path, headers={"Host": host, **(headers or {})})


@pytest.mark.parametrize("path", ["/metrics", "/v1/bans", "/v1/keys/alice"])
def test_dns_rebinding_gets_421_with_the_json_body(path: str) -> None:
    response = asyncio.run(admin_get(admin_config(), path, "evil.example:9464"))
    assert response.status_code == 421
    assert response.json()["error"] == "misdirected_request" and response.json()["success"] is False


def test_the_listen_address_as_host_is_answered() -> None:
    response = asyncio.run(admin_get(admin_config(), "/metrics", "127.0.0.1:9464"))
    assert response.status_code == 200 and "gateway_" in response.text


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_probes_answer_any_host(path: str) -> None:
    response = asyncio.run(admin_get(admin_config(), path, "evil.example"))
    assert response.status_code == 200


def test_the_token_is_compared_with_hmac_compare_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    config = admin_config(admin_token="right-token")
    wrong = asyncio.run(admin_get(config, "/metrics", "127.0.0.1:9464", {"Authorization": "Bearer wrong-token"}))
    right = asyncio.run(admin_get(config, "/metrics", "127.0.0.1:9464", {"Authorization": "Bearer right-token"}))
    assert (wrong.status_code, right.status_code) == (401, 200)
    assert calls == [(b"wrong-token", b"right-token"), (b"right-token", b"right-token")]


async def admin_call(method: str, path: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=create_admin_app(GatewayState.create(admin_config())))  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:9464") as client:
        return await client.request(method, path)


@pytest.mark.parametrize(("method", "path", "status", "error"), [
    ("GET", "/v1/nothing", 404, "not_found"),
    ("GET", "/v1/jobs/x/done", 405, "method_not_allowed"),
    ("PUT", "/metrics", 405, "method_not_allowed"),
])
def test_an_unknown_admin_path_or_method_gets_the_json_error_body(method: str, path: str, status: int, error: str) -> None:
    # Starlette's own answers were plain text: a client parsing every admin error as JSON failed.
    response = asyncio.run(admin_call(method, path))
    assert response.status_code == status
    assert response.json() == {"success": False, "error": error, "message": response.json()["message"]}
    if status == 405:
        assert response.headers["allow"]
