"""`request_framing` (one pass over the request headers for the body's framing) against the
separate readings it replaced: `declared_length`, "declares a body" and "expects 100-continue"."""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import given
from hypothesis import strategies as st

from gateway.proxy.request_body import declared_length, request_framing

_NAMES = st.sampled_from([b"content-length", b"transfer-encoding", b"expect", b"accept", b"host", b"x-api-key"])
_VALUES = st.one_of(
    st.sampled_from([b"0", b"12", b" 7 ", b"+5", b"1_000", b"-3", b"abc", b"", b"chunked", b"100-continue",
                     b" 100-CONTINUE ", b"100-continue, x"]),
    st.binary(max_size=8),
)
_HEADERS = st.lists(st.tuples(_NAMES, _VALUES), max_size=6)


def _reference(headers: Sequence[tuple[bytes, bytes]]) -> tuple[int | None, bool, bool]:
    framed = any(name in (b"content-length", b"transfer-encoding") for name, _ in headers)
    expects = any(name == b"expect" and value.strip().lower() == b"100-continue" for name, value in headers)
    return declared_length(headers), framed, expects


@given(_HEADERS)
def test_one_pass_reads_what_the_separate_readings_did(headers: list[tuple[bytes, bytes]]) -> None:
    assert request_framing(headers) == _reference(headers)


def test_the_first_content_length_counts_even_when_it_is_not_a_number() -> None:
    assert request_framing([(b"content-length", b"x"), (b"content-length", b"5")]) == (None, True, False)
    assert request_framing([(b"content-length", b"5"), (b"content-length", b"6")]) == (5, True, False)
