from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.admission import identity
from gateway.admission.identity import MAX_PROXY_HOPS, KeyExtractor, KeyTable, client_ip, hash_key, parse_ip
from gateway.config.model import Identity, Key

NETS = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("127.0.0.2/32"))


def test_hash_key_is_sha256_hex() -> None:
    assert hash_key("test") == "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"


@pytest.mark.parametrize(
    ("headers", "query", "expected"),
    [
        ([(b"x-api-key", b"k1")], b"", b"k1"),
        ([(b"authorization", b"Bearer k2")], b"", b"k2"),
        ([(b"authorization", b"bearer   k2  ")], b"", b"k2"),
        ([(b"authorization", b"Basic abc")], b"", None),  # not a bearer token: not our key
        ([], b"a=1&apikey=k%203&b=2", b"k 3"),
        ([], b"apikey=", None),
        ([(b"x-api-key", b"")], b"apikey=q", b"q"),
        ([(b"x-api-key", b"h")], b"apikey=q", b"h"),  # headers win over the query
        ([], b"", None),
    ],
)
def test_key_extraction(headers: list[tuple[bytes, bytes]], query: bytes, expected: bytes | None) -> None:
    extractor = KeyExtractor(Identity(api_key_headers=("X-API-Key", "Authorization"), api_key_query="apikey"))
    assert extractor.extract(headers, query) == expected


def test_query_disabled() -> None:
    extractor = KeyExtractor(Identity(api_key_headers=("X-API-Key",), api_key_query=None))
    assert extractor.extract([], b"apikey=k") is None


def test_key_table_looks_up_by_hash() -> None:
    key = Key(id="a", sha256=hash_key("secret"), plan="free")
    table = KeyTable([key])
    assert table.lookup(b"secret") is key
    assert table.lookup(b"secret ") is None


def test_key_table_remembers_matches_only() -> None:
    """The memo of matched secrets is bounded by the keys: misses are never remembered."""
    key = Key(id="a", sha256=hash_key("secret"), plan="free")
    table = KeyTable([key])
    for guess in range(1000):
        assert table.lookup(b"guess-%d" % guess) is None
    assert table.lookup(b"secret") is key
    assert table.lookup(b"secret") is key
    assert table._by_secret == {b"secret": key}
    assert KeyTable([]).lookup(b"secret") is None  # a new config's table knows only its own keys


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1.2.3.4", "1.2.3.4"),
        (" 1.2.3.4:80 ", "1.2.3.4"),
        ("[2001:db8::1]:443", "2001:db8::1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("2001:db8::1", "2001:db8::1"),
        ("::ffff:1.2.3.4", "1.2.3.4"),
        ("unknown", None),
        ("", None),
        ("[::1", None),
        ("1.2.3.4.5", None),
    ],
)
def test_parse_ip(text: str, expected: str | None) -> None:
    ip = parse_ip(text)
    assert (str(ip) if ip else None) == expected


def xff(*values: str) -> list[tuple[bytes, bytes]]:
    return [(b"x-forwarded-for", v.encode()) for v in values]


def test_untrusted_peer_xff_is_ignored() -> None:
    assert str(client_ip("127.0.0.3", xff("6.6.6.6"), NETS)) == "127.0.0.3"


def test_no_trusted_proxies_means_peer() -> None:
    assert str(client_ip("10.1.1.1", xff("6.6.6.6"), ())) == "10.1.1.1"


def test_trusted_peer_rightmost_untrusted_across_lines() -> None:
    headers = xff("1.1.1.1, 2.2.2.2", "10.0.0.5")
    assert str(client_ip("127.0.0.2", headers, NETS)) == "2.2.2.2"


def test_trusted_peer_garbage_falls_back_to_peer() -> None:
    assert str(client_ip("127.0.0.2", xff("1.1.1.1, unknown"), NETS)) == "127.0.0.2"


def test_trusted_peer_without_xff_is_peer() -> None:
    assert str(client_ip("127.0.0.2", [], NETS)) == "127.0.0.2"


def test_ports_and_mapped_addresses_in_xff() -> None:
    assert str(client_ip("127.0.0.2", xff("[2001:db8::7]:443"), NETS)) == "2001:db8::7"
    assert str(client_ip("::ffff:127.0.0.2", xff("::ffff:5.6.7.8"), NETS)) == "5.6.7.8"


@given(st.lists(st.text(max_size=40), max_size=5), st.sampled_from(["127.0.0.2", "127.0.0.3", "10.9.9.9"]))
def test_client_ip_never_raises_and_is_an_ip(values: list[str], peer: str) -> None:
    headers = [(b"x-forwarded-for", v.encode("utf-8", "surrogatepass")) for v in values]
    ip = client_ip(peer, headers, NETS)
    assert ip is not None
    if peer == "127.0.0.3":  # untrusted: whatever the header says, it is the peer
        assert str(ip) == peer


def test_a_chain_of_trusted_hops_is_walked_at_most_max_proxy_hops() -> None:
    # 19 trusted hops and the client: within the bound, the client is found.
    chain = ["6.6.6.6"] + ["10.0.0.9"] * (MAX_PROXY_HOPS - 1)
    assert str(client_ip("127.0.0.2", xff(", ".join(chain)), NETS)) == "6.6.6.6"
    # One trusted hop more and the client is past the bound: the peer, as for garbage.
    chain.insert(1, "10.0.0.9")
    assert str(client_ip("127.0.0.2", xff(", ".join(chain)), NETS)) == "127.0.0.2"
    # The same across header lines.
    assert str(client_ip("127.0.0.2", xff(*chain), NETS)) == "127.0.0.2"
    assert str(client_ip("127.0.0.2", xff(*chain[1:]), NETS)) == "10.0.0.9"


@pytest.mark.parametrize("lines", [1, 7000])
def test_a_trusted_peer_cannot_make_the_walk_cost_more_than_the_bound(
    lines: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 64 KiB of trusted hops (the head's bound) once took ~20 ms of the event loop: one address
    # parse per hop. Counted, not timed: no more than MAX_PROXY_HOPS parses, one line or many.
    parsed: list[str] = []
    real_parse = identity.parse_ip

    def counting_parse(text: str) -> object:
        parsed.append(text)
        return real_parse(text)

    monkeypatch.setattr(identity, "parse_ip", counting_parse)
    hops = ["10.0.0.1"] * 7000
    headers = xff(",".join(hops)) if lines == 1 else xff(*hops)
    assert str(client_ip("10.0.0.2", headers, NETS)) == "10.0.0.2"
    assert len(parsed) <= MAX_PROXY_HOPS + 1  # the hops and the peer
