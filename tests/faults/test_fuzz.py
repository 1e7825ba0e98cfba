"""Hypothesis against the code that reads hostile input: the client-IP walk, the request and
response header filters, and the config loader's fault-related fields. Only declared errors
may escape, and what comes out must keep its promises (who the client is, what the upstream
and the client never see). tests/unit has the example-based tests and broader loader fuzzing."""

from __future__ import annotations

import ipaddress

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.admission.identity import IPAddress, client_ip, is_trusted, unwrap
from gateway.config.loader import ConfigError, load_config_text
from gateway.config.model import Identity, Upstream
from gateway.proxy.headers import (
    HOP_BY_HOP,
    HeaderPolicy,
    InvalidUpstreamHeaders,
    client_response_headers,
    upstream_request_headers,
)

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- client IP ---------------------------------------------------------------------------------

TRUSTED = (ipaddress.ip_network("127.0.0.2/32"), ipaddress.ip_network("10.0.0.0/8"),
           ipaddress.ip_network("2001:db8:1::/48"))
_ADDRESSES = st.one_of(
    st.sampled_from(["127.0.0.2", "10.1.2.3", "10.255.0.1", "2001:db8:1::5", "127.0.0.3", "192.0.2.7",
                     "2001:db8:2::9"]).map(ipaddress.ip_address),
    st.ip_addresses(),
)
_GARBAGE = st.one_of(st.sampled_from(["", "unknown", "1.2.3", "::g", "_hidden", "[::1", "1.2.3.4:x:y", "*"]),
                     st.text(alphabet="abcxyz_-*/", min_size=1, max_size=8))


@st.composite
def hops(draw: st.DrawFn) -> tuple[IPAddress | None, str]:
    """One X-Forwarded-For hop: (the address it names, or None for garbage; its text)."""
    if draw(st.integers(0, 5)) == 0:
        return None, draw(_GARBAGE)
    ip = draw(_ADDRESSES)
    port = draw(st.integers(1, 65535))
    if ip.version == 4:
        text = draw(st.sampled_from([str(ip), f"{ip}:{port}", f"::ffff:{ip}"]))
    else:
        text = draw(st.sampled_from([str(ip), f"[{ip}]", f"[{ip}]:{port}"]))
    return unwrap(ip), draw(st.sampled_from(["", " "])) + text + draw(st.sampled_from(["", " "]))


def expected_client(peer: IPAddress, chain: list[tuple[IPAddress | None, str]]) -> IPAddress:
    """SPEC §1: only from a trusted peer, walk right to left over trusted hops; the first
    untrusted valid IP; garbage ends the walk with the peer."""
    if not is_trusted(peer, TRUSTED):
        return peer
    best = peer
    for ip, _ in reversed(chain):
        if ip is None:
            return peer
        if not is_trusted(ip, TRUSTED):
            return ip
        best = ip
    return best


@FUZZ
@given(_ADDRESSES, st.lists(st.lists(hops(), min_size=1, max_size=4), max_size=3), st.binary(max_size=30))
def test_client_ip_is_the_peer_or_the_rightmost_untrusted_hop(
    peer: IPAddress, lines: list[list[tuple[IPAddress | None, str]]], noise: bytes
) -> None:
    headers = [(b"x-forwarded-for", ",".join(text for _, text in line).encode()) for line in lines]
    headers.insert(len(headers) // 2, (b"x-other", noise))  # other headers never matter
    chain = [hop for line in lines for hop in line]
    assert client_ip(str(peer), headers, TRUSTED) == expected_client(unwrap(peer), chain)


@FUZZ
@given(st.text(max_size=20), st.lists(st.binary(max_size=60), max_size=4))
def test_client_ip_never_raises_on_any_bytes(peer: str, values: list[bytes]) -> None:
    headers = [(b"x-forwarded-for", value) for value in values]
    ip = client_ip(peer, headers, TRUSTED)
    assert ip is None or isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address)


# -- header filters ------------------------------------------------------------------------------

POLICY = HeaderPolicy.from_config(
    Upstream(url="http://u", set_headers=(("X-Upstream-Token", "up-secret"),)),
    Identity(api_key_headers=("X-API-Key", "Authorization")),
)
GATEWAY_OWNED = {
    b"x-forwarded-for", b"x-forwarded-proto", b"x-gateway-key-id", b"x-gateway-plan", b"x-upstream-token"
}
_NAMES = st.one_of(
    st.sampled_from(sorted(HOP_BY_HOP | GATEWAY_OWNED | {
        b"x-api-key", b"authorization", b"host", b"content-length", b"expect", b"forwarded", b"x-real-ip",
        b"x-forwarded-host", b"accept", b"x-custom", b"cookie", b"content-type",
        b"x-forwarded-port", b"x-forwarded-prefix", b"true-client-ip", b"cf-connecting-ip"})),
    st.from_regex(rb"\A[a-z0-9!#$%&'*+.^_`|~-]{1,12}\Z"),
    st.sampled_from(sorted(GATEWAY_OWNED | {b"x-api-key", b"x-real-ip"})).map(lambda n: n.replace(b"-", b"_")),
)
_VALUES = st.binary(max_size=40).filter(lambda v: not any(c in v for c in b"\r\n\x00"))


@st.composite
def client_headers(draw: st.DrawFn) -> list[tuple[bytes, bytes]]:
    headers = draw(st.lists(st.tuples(_NAMES, _VALUES), max_size=12))
    if draw(st.booleans()):  # a Connection header naming some of them, gateway-owned ones too
        named = draw(st.lists(_NAMES, max_size=4))
        headers.insert(draw(st.integers(0, len(headers))), (b"connection", b", ".join(named)))
    return headers


@FUZZ
@given(client_headers())
def test_upstream_sees_the_clients_headers_minus_hop_and_owned_plus_the_gateways(
    headers: list[tuple[bytes, bytes]]
) -> None:
    out = upstream_request_headers(POLICY, headers, key_id="k1", plan="pro",
                                   forwarded_for="192.0.2.1", forwarded_proto="http")
    named = {token.strip().lower() for name, value in headers if name == b"connection"
             for token in value.split(b",") if token.strip()}
    stripped = POLICY.strip | named
    kept = [(name, value) for name, value in headers
            if name not in stripped and not name.startswith(b"x-forwarded-")  # every client-IP header
            and b"_" not in name]  # what a CGI-style upstream reads as the `-` spelling
    added = [(b"x-forwarded-for", b"192.0.2.1"), (b"x-forwarded-proto", b"http"),
             (b"x-gateway-key-id", b"k1"), (b"x-gateway-plan", b"pro"), (b"x-upstream-token", b"up-secret")]
    assert out == kept + added  # order kept, nothing hop-level or client-claimed survives
    names = [name for name, _ in out]
    assert not (set(names) & (HOP_BY_HOP | {b"x-api-key", b"authorization", b"host", b"content-length"}))
    for owned in GATEWAY_OWNED:  # exactly once, with the gateway's value
        assert names.count(owned) == 1
    # Nor once more under a spelling a WSGI/PHP upstream folds onto it (`X_Gateway_Key_Id`).
    folded = [name.replace(b"_", b"-") for name in names]
    for owned in GATEWAY_OWNED:
        assert folded.count(owned) == 1


_ANY_NAMES = st.one_of(_NAMES, st.binary(max_size=12))
_ANY_VALUES = st.binary(max_size=40)


@FUZZ
@given(st.lists(st.tuples(_ANY_NAMES, _ANY_VALUES), max_size=12), st.booleans())
def test_client_sees_valid_upstream_headers_or_the_upstream_is_refused(
    headers: list[tuple[bytes, bytes]], huge: bool
) -> None:
    if huge:
        headers = [*headers, (b"x-huge", b"a" * 70_000)]
    try:
        out = client_response_headers(200, headers)
    except InvalidUpstreamHeaders:
        return  # the forwarder answers 502
    named = {token.strip().lower() for name, value in headers if name.lower() == b"connection"
             for token in value.split(b",") if token.strip()}
    for name, value in out:
        assert name and all(33 <= c <= 126 and c not in b'"(),/:;<=>?@[\\]{}' for c in name)
        assert not any(c < 32 and c != 9 or c == 127 for c in value)  # no CR, LF, NUL or control
        assert name.lower() not in HOP_BY_HOP and name.lower() not in named
    assert out == [h for h in headers if h in out]  # nothing invented, order kept


# -- config: the fault-handling fields -----------------------------------------------------------

MINIMAL = """\
upstream: {url: "http://127.0.0.1:9000"}
keys: [{id: k, key: secret, plan: p}]
plans: {p: {limits: {rpm: {rate: 10/1m}}}}
routes: [{path: "/**", limits: [rpm]}]
"""
_SCALARS = st.one_of(
    st.sampled_from(["30s", "250ms", "0", "0s", "-1s", "1h", "2", "1.5", "abc", "~", "''", "[1]", "{a: 1}",
                     "1e309", "99999999999999999999", "${X}", "${X:-5s}", "true"]),
    st.integers(-(2**40), 2**40).map(str),
    st.text(alphabet="0123456789.smhd -+e", max_size=8),
)


@FUZZ
@given(_SCALARS, _SCALARS)
def test_client_timeout_and_local_divisor_load_or_fail_with_a_located_problem(
    timeout: str, divisor: str
) -> None:
    text = MINIMAL + f"client_timeout: {timeout}\nstore: {{local_divisor: {divisor}}}\n"
    try:
        config = load_config_text(text, "t.yaml", env={"X": "1"})
    except ConfigError as error:
        assert error.problems and all(problem.startswith("t.yaml:") for problem in error.problems)
        return
    assert config.client_timeout > 0 and config.client_timeout != float("inf")
    assert isinstance(config.store.local_divisor, int) and config.store.local_divisor >= 1
