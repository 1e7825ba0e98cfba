"""Header, query and URL hygiene: pure functions, no I/O."""

from __future__ import annotations

from urllib.parse import parse_qsl, unquote_plus, urlsplit

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from yarl import URL

from gateway.config.model import Identity, Upstream
from gateway.proxy.headers import (
    HOP_BY_HOP,
    HeaderPolicy,
    InvalidUpstreamHeaders,
    client_response_headers,
    strip_query_param,
    upstream_request_headers,
    upstream_url,
)

UPSTREAM = Upstream(
    url="http://127.0.0.1:9000",
    set_headers=(("X-Upstream-Token", "tok-123"), ("X-Tenant", "gw")),
    key_id_header="X-Gateway-Key-Id",
    plan_header="X-Gateway-Plan",
)
IDENTITY = Identity(api_key_headers=("X-API-Key", "Authorization"), api_key_query="apikey")
POLICY = HeaderPolicy.from_config(UPSTREAM, IDENTITY)


def forwarded(client_headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return upstream_request_headers(
        POLICY,
        client_headers,
        key_id="acme-live",
        plan="pro",
        forwarded_for="203.0.113.7",
        forwarded_proto="https",
    )


GATEWAY_ADDED = [
    (b"x-forwarded-for", b"203.0.113.7"),
    (b"x-forwarded-proto", b"https"),
    (b"x-gateway-key-id", b"acme-live"),
    (b"x-gateway-plan", b"pro"),
    (b"x-upstream-token", b"tok-123"),
    (b"x-tenant", b"gw"),
]


def test_a_reflected_request_carries_everything_but_set_headers() -> None:
    client = [(b"x-custom", b"kept"), (b"x-upstream-token", b"spoofed")]
    reflected = upstream_request_headers(POLICY, client, key_id="acme-live", plan="pro", forwarded_for="203.0.113.7",
                                         forwarded_proto="https", reflected=True)
    assert reflected == [(b"x-custom", b"kept"), *GATEWAY_ADDED[:4]]
    assert forwarded(client) == [(b"x-custom", b"kept"), *GATEWAY_ADDED]


class TestPolicy:
    def test_strip_set_covers_hop_by_hop_identity_and_gateway_names(self) -> None:
        expected = {
            *HOP_BY_HOP,
            b"host",
            b"content-length",
            b"x-api-key",
            b"authorization",
            b"x-forwarded-for",
            b"x-forwarded-proto",
            b"x-forwarded-host",
            b"forwarded",
            b"x-real-ip",
            b"x-gateway-key-id",
            b"x-gateway-plan",
            b"x-upstream-token",
            b"x-tenant",
        }
        assert expected <= POLICY.strip
        for name in (b"connection", b"te", b"trailer", b"upgrade", b"proxy-authorization", b"keep-alive"):
            assert name in POLICY.strip

    def test_configured_names_are_lower_cased(self) -> None:
        policy = HeaderPolicy.from_config(
            Upstream(
                url="http://u", key_id_header="X-Key", plan_header="X-PLAN", set_headers=(("X-Tok", "v"),)
            ),
            Identity(api_key_headers=("X-My-Key",)),
        )
        assert {b"x-key", b"x-plan", b"x-tok", b"x-my-key"} <= policy.strip
        assert policy.set_headers == ((b"x-tok", b"v"),)


class TestUpstreamRequestHeaders:
    def test_plain_headers_pass_in_order_then_gateway_headers(self) -> None:
        client = [
            (b"accept", b"application/json"),
            (b"cookie", b"a=1"),
            (b"user-agent", b"curl/8"),
            (b"cookie", b"b=2"),
            (b"content-type", b"application/json; charset=utf-8"),
        ]
        assert forwarded(client) == client + GATEWAY_ADDED

    def test_every_client_ip_header_is_dropped(self) -> None:
        client = [
            (b"true-client-ip", b"1.2.3.4"),
            (b"cf-connecting-ip", b"1.2.3.4"),
            (b"fastly-client-ip", b"1.2.3.4"),
            (b"x-client-ip", b"1.2.3.4"),
            (b"x-cluster-client-ip", b"1.2.3.4"),
            (b"x-original-forwarded-for", b"1.2.3.4"),
            (b"x-real-ip", b"1.2.3.4"),
            (b"forwarded", b"for=1.2.3.4"),
            (b"x-forwarded-for", b"1.2.3.4"),
            (b"x-forwarded-port", b"443"),
            (b"x-forwarded-prefix", b"/admin"),
            (b"x-forwarded-server", b"evil"),
            (b"x-forwardedness", b"kept: not the prefix"),
        ]
        assert forwarded(client) == [(b"x-forwardedness", b"kept: not the prefix"), *GATEWAY_ADDED]

    def test_values_pass_byte_for_byte(self) -> None:
        client = [(b"x-latin", b"\xff\xfe\x80"), (b"x-utf8", "caf\u00e9".encode())]
        assert forwarded(client) == client + GATEWAY_ADDED

    def test_hop_by_hop_identity_and_spoofed_headers_are_dropped(self) -> None:
        client = [
            (b"host", b"gateway.example"),
            (b"connection", b"keep-alive"),
            (b"keep-alive", b"timeout=5"),
            (b"te", b"trailers"),
            (b"transfer-encoding", b"chunked"),
            (b"content-length", b"12"),
            (b"upgrade", b"websocket"),
            (b"proxy-authorization", b"Basic eA=="),
            (b"proxy-connection", b"keep-alive"),
            (b"trailer", b"x-sum"),
            (b"expect", b"100-continue"),
            (b"x-api-key", b"sk_live_secret"),
            (b"authorization", b"Bearer sk_live_secret"),
            (b"x-forwarded-for", b"1.2.3.4"),
            (b"x-forwarded-proto", b"http"),
            (b"x-forwarded-host", b"evil"),
            (b"forwarded", b"for=1.2.3.4"),
            (b"x-real-ip", b"1.2.3.4"),
            (b"x-gateway-key-id", b"someone-else"),
            (b"x-gateway-plan", b"business"),
            (b"x-upstream-token", b"forged"),
            (b"x-keep", b"yes"),
        ]
        assert forwarded(client) == [(b"x-keep", b"yes"), *GATEWAY_ADDED]

    def test_connection_named_headers_are_dropped_but_gateway_headers_survive(self) -> None:
        # The Davison attack: nominate the gateway's own headers as hop-by-hop.
        client = [
            (b"connection", b"close, X-Forwarded-For, X-Gateway-Key-Id,X-Upstream-Token , X-Custom-Hop"),
            (b"x-custom-hop", b"dropped"),
            (b"x-gateway-key-id", b"spoofed"),
            (b"x-other", b"kept"),
        ]
        assert forwarded(client) == [(b"x-other", b"kept"), *GATEWAY_ADDED]

    def test_every_connection_header_line_counts(self) -> None:
        client = [
            (b"connection", b"x-one"),
            (b"x-one", b"1"),
            (b"x-two", b"2"),
            (b"connection", b"X-TWO"),
            (b"x-three", b"3"),
        ]
        assert forwarded(client) == [(b"x-three", b"3"), *GATEWAY_ADDED]

    def test_input_list_is_not_modified(self) -> None:
        client = [(b"connection", b"x-a"), (b"x-a", b"1")]
        forwarded(client)
        assert client == [(b"connection", b"x-a"), (b"x-a", b"1")]


class TestClientResponseHeaders:
    def test_hop_by_hop_and_connection_named_are_dropped_rest_byte_for_byte(self) -> None:
        upstream = [
            (b"Connection", b"keep-alive, X-Upstream-Hop"),
            (b"X-Upstream-Hop", b"secret"),
            (b"Keep-Alive", b"timeout=5"),
            (b"Proxy-Authenticate", b"Basic"),
            (b"Trailer", b"X-Sum"),
            (b"Upgrade", b"h2c"),
            (b"Set-Cookie", b"a=1; Path=/"),
            (b"Content-Encoding", b"gzip"),
            (b"Set-Cookie", b"b=2; Path=/"),
            (b"Content-Length", b"95"),
            (b"X-Mixed", b"Case  kept\t"),
        ]
        assert client_response_headers(200, upstream) == [
            (b"Set-Cookie", b"a=1; Path=/"),
            (b"Content-Encoding", b"gzip"),
            (b"Set-Cookie", b"b=2; Path=/"),
            (b"Content-Length", b"95"),
            (b"X-Mixed", b"Case  kept\t"),
        ]

    def test_transfer_encoding_drops_a_conflicting_content_length(self) -> None:
        upstream = [(b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"10"), (b"X-A", b"1")]
        assert client_response_headers(200, upstream) == [(b"X-A", b"1")]

    @pytest.mark.parametrize("status", [204, 304])
    def test_a_response_without_content_loses_its_framing(self, status: int) -> None:
        """A 304's Content-Length (the length a 200 would have had: allowed) would make the server
        wait for body bytes that never come."""
        upstream = [(b"ETag", b'"v1"'), (b"Content-Length", b"100"), (b"Transfer-Encoding", b"chunked")]
        assert client_response_headers(status, upstream) == [(b"ETag", b'"v1"')]
        assert client_response_headers(200, upstream[:2]) == upstream[:2]

    @pytest.mark.parametrize("status", [0, 99, 100, 101, 102, 103, 199, 600, 999])
    def test_a_status_that_is_no_final_answer_raises(self, status: int) -> None:
        with pytest.raises(InvalidUpstreamHeaders, match=str(status)):
            client_response_headers(status, [(b"content-length", b"2")])

    @pytest.mark.parametrize("status", [200, 299, 599])
    def test_every_final_status_passes(self, status: int) -> None:
        assert client_response_headers(status, [(b"content-length", b"2")]) == [(b"content-length", b"2")]

    def test_obs_text_values_pass(self) -> None:
        assert client_response_headers(200, [(b"x-name", b"caf\xe9")]) == [(b"x-name", b"caf\xe9")]

    @pytest.mark.parametrize(
        "header",
        [
            (b"x-bad", b"a\rb"),
            (b"x-bad", b"a\nb"),
            (b"x-bad", b"a\x00b"),
            (b"x-bad", b"a\x7fb"),
            (b"x bad", b"v"),
            (b"x:bad", b"v"),
            (b"", b"v"),
            (b"x-huge", b"a" * 70_000),
        ],
    )
    def test_values_the_server_would_refuse_raise(self, header: tuple[bytes, bytes]) -> None:
        with pytest.raises(InvalidUpstreamHeaders):
            client_response_headers(200, [(b"content-type", b"text/plain"), header])


class TestStripQueryParam:
    @pytest.mark.parametrize(
        ("query", "expected"),
        [
            (b"", b""),
            (b"apikey=s", b""),
            (b"apikey=s&a=1", b"a=1"),
            (b"a=1&apikey=s", b"a=1"),
            (b"a=1&apikey=s&b=2&apikey=t", b"a=1&b=2"),
            (b"a=1&apikey", b"a=1"),
            (b"api%6Bey=s&a=1", b"a=1"),
            (b"%61%70%69%6b%65%79=s&a=1", b"a=1"),
            (b"apikeyx=1&xapikey=2&q=apikey", b"apikeyx=1&xapikey=2&q=apikey"),
            (b"ApiKey=1", b"ApiKey=1"),
            (b"a=%20+%2B&apikey=1&&c", b"a=%20+%2B&&c"),
            (b"url=https%3A%2F%2Fx.io%2F%3Fapikey%3D1", b"url=https%3A%2F%2Fx.io%2F%3Fapikey%3D1"),
        ],
    )
    def test_examples(self, query: bytes, expected: bytes) -> None:
        assert strip_query_param(query, "apikey") == expected

    def test_untouched_query_is_the_same_object(self) -> None:
        query = b"a=1&b=2"
        assert strip_query_param(query, "apikey") is query

    @given(
        st.lists(
            st.tuples(
                st.sampled_from(["apikey", "api%6Bey", "apikey2", "a", "b+c", "%41", ""]),
                st.text(alphabet="ab=%2F+&", max_size=6),
                st.booleans(),
            ),
            max_size=8,
        )
    )
    def test_matches_what_parse_qsl_would_read(self, parts: list[tuple[str, str, bool]]) -> None:
        query = "&".join(
            f"{name}={value.replace('&', '')}" if has_eq else name for name, value, has_eq in parts
        )
        raw = query.encode()
        result = strip_query_param(raw, "apikey").decode()
        before = parse_qsl(query, keep_blank_values=True)
        after = parse_qsl(result, keep_blank_values=True)
        assert all(name != "apikey" for name, _ in after)
        assert after == [pair for pair in before if pair[0] != "apikey"]
        kept = [seg for seg in query.split("&") if unquote_plus(seg.split("=", 1)[0]) != "apikey"]
        assert result == "&".join(kept)


BASE = "http://127.0.0.1:9000"


class TestUpstreamUrl:
    @pytest.mark.parametrize(
        ("base", "path", "query", "expected"),
        [
            (BASE, b"/v1/scrape", b"", f"{BASE}/v1/scrape"),
            (
                BASE,
                b"/v1/scrape",
                b"url=https%3A%2F%2Fx.io&n=1",
                f"{BASE}/v1/scrape?url=https%3A%2F%2Fx.io&n=1",
            ),
            (BASE + "/api", b"/v1/crawl/abc", b"", f"{BASE}/api/v1/crawl/abc"),
            (BASE, b"/", b"", f"{BASE}/"),
            (BASE, b"/v1/file.v2.json", b"", f"{BASE}/v1/file.v2.json"),
            (
                BASE,
                b"/v1/scrape/https%3A%2F%2Fx.io%2Fa.html",
                b"",
                f"{BASE}/v1/scrape/https%3A%2F%2Fx.io%2Fa.html",
            ),
            (BASE, b"//evil.com/x", b"", f"{BASE}//evil.com/x"),
            (BASE, b"/@evil.com/x", b"", f"{BASE}/@evil.com/x"),
            (BASE, b"/a/...", b"", f"{BASE}/a/..."),
        ],
    )
    def test_forwardable(self, base: str, path: bytes, query: bytes, expected: str) -> None:
        assert upstream_url(base, path, query) == expected

    @pytest.mark.parametrize(
        "path",
        [
            b"",
            b"*",
            b"@evil.com/x",
            b"evil.com/x",
            b"http://evil.com/x",
            b"/a/../b",
            b"/..",
            b"/./x",
            b"/a/.",
            b"/..%2f",
            b"/..%2F",
            b"/%2e%2e/x",
            b"/%2E%2e%2Fadmin",
            b"/a%2f..%2fb",
            b"/a\\..\\b",
            b"/a b",
            b"/a\tb",
            b"/a#frag",
            b"/caf\xc3\xa9",
            b"/a\x00",
            b"/\\evil.com",  # a backslash anywhere (issue 15: gateway/proxy/target.py)
        ],
    )
    def test_refused(self, path: bytes) -> None:
        assert upstream_url(BASE, path, b"") is None

    @pytest.mark.parametrize("query", [b"a=1#frag", b"a=\xff", b"a= b"])
    def test_refused_query(self, query: bytes) -> None:
        assert upstream_url(BASE, b"/v1", query) is None

    @pytest.mark.parametrize(
        "path",
        [
            b"//evil.com/x",
            b"//evil.com:80/x",
            b"/@evil.com",
            b"/%40evil.com",
            b"//user@evil.com/",
        ],
    )
    def test_every_parser_keeps_the_configured_host(self, path: bytes) -> None:
        url = upstream_url(BASE, path, b"a=1")
        assert url is not None
        yarl_url = URL(url, encoded=True)
        httpx_url = httpx.URL(url)
        split = urlsplit(url)
        assert (yarl_url.host, yarl_url.port) == ("127.0.0.1", 9000)
        assert (httpx_url.host, httpx_url.port) == ("127.0.0.1", 9000)
        assert (split.hostname, split.port) == ("127.0.0.1", 9000)
        assert yarl_url.raw_path == path.decode()
