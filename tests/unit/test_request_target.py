"""Strict request paths (gateway/proxy/target.py): a table of attack forms and of ordinary
paths, and properties over generated ones (issue 15, item 5)."""

from __future__ import annotations

from urllib.parse import unquote_to_bytes

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.proxy.headers import upstream_url
from gateway.proxy.target import MAX_DECODINGS, path_problem

REFUSED = [
    # the four, each forwarded and answered 200 under /v1/** before
    (b"/v1/..;/admin", "a dot segment"),
    (b"/v1/.%00./admin", "a control byte"),
    (b"/v1/%c0%ae%c0%ae/admin", "overlong UTF-8"),
    (b"/v1/%252e%252e/admin", "a dot segment"),
    # dot segments, plain, with a parameter, encoded, made by an encoded slash
    (b"/v1/../admin", "a dot segment"),
    (b"/v1/./x", "a dot segment"),
    (b"/v1/.;jsessionid=1/x", "a dot segment"),
    (b"/v1/..;x=y/admin", "a dot segment"),
    (b"/v1/%2e%2e/admin", "a dot segment"),
    (b"/v1/%2E%2e;/admin", "a dot segment"),
    (b"/v1/a%2f..%2fadmin", "a dot segment"),
    (b"/v1/..", "a dot segment"),
    (b"/v1/%25252e%25252e/admin", "a dot segment"),  # encoded three times
    # backslashes, raw or encoded
    (b"/v1/..\\admin", "a backslash"),
    (b"/v1/a%5cb", "a backslash"),
    (b"/v1/a%255cb", "a backslash"),
    # control bytes, raw or encoded (once or twice)
    (b"/v1/a\x00b", "a control byte"),
    (b"/v1/a%00", "a control byte"),
    (b"/v1/a%0d%0aX-Injected:%201", "a control byte"),
    (b"/v1/a%7f", "a control byte"),
    (b"/v1/a%2500", "a control byte"),
    # overlong UTF-8 for '.', '/' and '\'
    (b"/v1/%c0%ae", "overlong UTF-8"),
    (b"/v1/%c0%af", "overlong UTF-8"),
    (b"/v1/%c1%9c", "overlong UTF-8"),
    (b"/v1/%e0%80%ae", "overlong UTF-8"),
    (b"/v1/%f0%80%80%ae", "overlong UTF-8"),
    (b"/v1/%25c0%25ae", "overlong UTF-8"),
]

ACCEPTED = [
    b"/",
    b"/v1/scrape",
    b"/v1/crawl/abc-123",
    b"/v1/files/report.v2.pdf",
    b"/v1/a..b/...",  # not dot segments
    b"/v1/.well-known/x",
    b"/v1/a;b=c",  # a parameter on an ordinary segment
    b"/v1/100%25",  # a literal percent sign
    b"/v1/100%25done",
    b"/v1/caf%C3%A9",  # valid UTF-8
    b"/v1/%E2%82%AC",
    b"/v1/a%20b",
    b"/v1/%e0%a4%85",  # E0 followed by A0-BF is valid
    b"/v1/%",  # a stray percent stays what it is
]


@pytest.mark.parametrize(("path", "problem"), REFUSED)
def test_attack_forms_are_refused_with_their_reason(path: bytes, problem: str) -> None:
    assert path_problem(path) == problem


@pytest.mark.parametrize("path", ACCEPTED)
def test_ordinary_paths_pass(path: bytes) -> None:
    assert path_problem(path) is None


def test_a_url_in_the_query_is_the_clients_business() -> None:
    url = upstream_url("http://up:9000", b"/v1/scrape", b"url=https%3A%2F%2Fexample.com%2Fa%2F..%2Fb")
    assert url == "http://up:9000/v1/scrape?url=https%3A%2F%2Fexample.com%2Fa%2F..%2Fb"
    assert upstream_url("http://up:9000", b"/v1/..;/admin", b"") is None


def _decodings(path: bytes) -> list[bytes]:
    levels = [path]
    for _ in range(MAX_DECODINGS):
        decoded = unquote_to_bytes(levels[-1])
        if decoded == levels[-1]:
            break
        levels.append(decoded)
    return levels


def _bad(level: bytes) -> bool:
    return (
        b"\\" in level
        or any(byte < 0x20 or byte == 0x7F for byte in level)
        or any(segment.split(b";", 1)[0] in (b".", b"..") for segment in level.split(b"/"))
    )


def _encode(data: bytes, times: int) -> bytes:
    for _ in range(times):
        data = b"".join(b"%%%02x" % byte for byte in data)
    return data


SEGMENT = st.binary(max_size=8) | st.sampled_from([b".", b"..", b"..;x", b".;", b"a.b", b"%2e", b"%25", b"\\"])


@settings(max_examples=400, deadline=None)
@given(st.lists(SEGMENT, min_size=1, max_size=5))
def test_a_path_that_passes_has_no_bad_form_at_any_decoding(segments: list[bytes]) -> None:
    path = b"/" + b"/".join(segments)
    if path_problem(path) is None:
        assert not any(_bad(level) for level in _decodings(path))


@settings(max_examples=300, deadline=None)
@given(
    prefix=st.lists(st.from_regex(rb"\A[a-z0-9_-]{1,6}\Z"), max_size=3),
    core=st.sampled_from([b"..", b".", b"..;p", b"\\", b"\x00", b"\r\n", b"\xc0\xae", b"\xe0\x80\xae"]),
    times=st.integers(0, 3),
)
def test_a_bad_form_is_refused_however_often_it_was_encoded(prefix: list[bytes], core: bytes, times: int) -> None:
    path = b"/" + b"/".join([*prefix, _encode(core, times), b"admin"])
    assert path_problem(path) is not None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=60))
def test_never_raises(path: bytes) -> None:
    assert path_problem(b"/" + path) in (None, "a control byte", "a backslash", "a dot segment",
                                         "overlong UTF-8", "percent-encoded too many times")
