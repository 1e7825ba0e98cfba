"""The streaming field scan of job answers (gateway/jobs/scan.py): it finds what json.loads and
`lookup` find, whatever the document's size and however its bytes are split, keeping only small
buffers; it answers with the chunk that completes the value."""

from __future__ import annotations

import json
import random
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.jobs.scan import CONTAINER, TOO_LONG, VALUE_CAP, FieldScan, Scan
from tests.support.dotted import lookup

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=30,
)


def scanned(body: bytes, path: str, chunks: list[bytes] | None = None) -> FieldScan:
    scan = FieldScan(path)
    for chunk in chunks if chunks is not None else [body]:
        if scan.feed(chunk):
            break
    scan.finish()
    return scan


def as_lookup(scan: FieldScan) -> Any:
    """The scan's answer as `lookup` gives it (None for absent; containers by a marker)."""
    assert scan.state in (Scan.FOUND, Scan.ABSENT), scan.state
    return scan.value if scan.state is Scan.FOUND else None


def expected(document: Any, path: str) -> Any:
    value = lookup(document, path)
    return CONTAINER if isinstance(value, dict | list) else value


def paths_in(document: Any, prefix: str = "") -> list[str]:
    """Dotted paths to every value of the document (keys with a dot cannot be named)."""
    found = []
    members = (document.items() if isinstance(document, dict)
               else enumerate(document) if isinstance(document, list) else ())
    for name, value in members:
        if "." in str(name) or str(name) == "":
            continue
        path = f"{prefix}{name}"
        found.append(path)
        found.extend(paths_in(value, path + "."))
    return found


def split(body: bytes, rng: random.Random) -> list[bytes]:
    cuts = sorted(rng.sample(range(1, len(body)), min(len(body) - 1, rng.randint(0, 12)))) if len(body) > 1 else []
    return [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=JSON_VALUES, data=st.data())
def test_the_scan_finds_what_json_loads_finds_in_any_chunks(document: Any, data: st.DataObject) -> None:
    # (json.dumps writes every key once: no duplicate keys, on which json.loads keeps the last)
    ensure_ascii = data.draw(st.booleans())
    indent = data.draw(st.sampled_from([None, 0, 2]))
    separators = data.draw(st.sampled_from([None, (",", ":"), (" , ", " : ")]))
    body = json.dumps(document, ensure_ascii=ensure_ascii, indent=indent, separators=separators).encode()
    body = data.draw(st.sampled_from([b"", b" ", b"\n\t"])) + body + data.draw(st.sampled_from([b"", b"\r\n"]))
    candidates = paths_in(document) + ["id", "0", "nope.deeper", "0.0", "a"]
    path = data.draw(st.sampled_from(candidates))
    chunks = split(body, random.Random(data.draw(st.integers(0, 2**32))))
    scan = scanned(body, path, chunks)
    want = expected(document, path)
    got = as_lookup(scan)
    assert got == want and type(got) is type(want), (body, path, got, want)
    # Any prefix of it (a body cut short) answers the same, or UNREADABLE: never a wrong answer.
    cut = data.draw(st.integers(0, len(body)))
    partial = scanned(body[:cut], path)
    if partial.state in (Scan.FOUND, Scan.ABSENT):
        assert as_lookup(partial) == want and type(as_lookup(partial)) is type(want), (body[:cut], path)


def test_a_field_after_a_huge_array_is_found_with_little_kept() -> None:
    body = json.dumps({"data": [{"markdown": "y\\\"}]" * 300, "n": [1, {"x": "]"}]}] * 3000,
                       "status": "completed"}).encode()
    assert len(body) > 3_000_000
    scan = FieldScan("status")
    for start in range(0, len(body), 16_384):
        scan.feed(body[start : start + 16_384])
    assert (scan.state, scan.value) == (Scan.FOUND, "completed")
    assert len(scan._buffer) < 64  # only the value itself was kept


def test_the_answer_is_known_with_the_chunk_that_completes_the_value() -> None:
    scan = FieldScan("data.id")
    assert not scan.feed(b'{"data": {"id": "jo')
    assert scan.feed(b'b-7", "more": [')  # the rest is never needed
    assert scan.value == "job-7"
    first = FieldScan("status")
    assert first.feed(b'{"status": "completed", "data": [')  # the field before a huge array
    assert first.value == "completed"


def test_keys_are_compared_decoded_and_lists_by_index() -> None:
    assert scanned(b'{"st\\u0061tus": "done"}', "status").value == "done"
    assert scanned(b'{"items": [{"id": 1}, {"id": 2}]}', "items.1.id").value == 2
    assert scanned(b'{"items": {"1": {"id": "k"}}}', "items.1.id").value == "k"
    assert scanned(b'[{"id": "top"}]', "0.id").value == "top"
    assert scanned(b'{"id": "first", "id": "second"}', "id").value == "first"  # the first one wins


def test_absent_values_are_known_when_their_container_closes() -> None:
    for body, path in ((b'{"a": 1} ', "id"), (b'{"id": null}', "id"), (b'{"data": "x"}', "data.id"),
                       (b"[1, 2]", "5"), (b'{"a": []}', "a.0"), (b'{"a": [1]}', "a.x"), (b"42", "id")):
        scan = scanned(body, path)
        assert as_lookup(scan) is None, (body, path)


def test_what_cannot_be_read_is_unreadable_not_absent() -> None:
    for body in (b'{"id": ', b'{"a": [1, 2', b"<html>", b'{"id" "x"}', b'{"a": 1 "id": 2}', b'{"id": nope}',
                 b'{"id": "\\x"}', b"{,}"):
        assert scanned(body, "id").state is Scan.UNREADABLE, body
    assert FieldScan("id").finish() is Scan.EMPTY
    assert scanned(b"  \n", "id").state is Scan.EMPTY


def test_values_over_the_cap_are_reported_too_long_and_not_kept() -> None:
    long_id = "x" * (VALUE_CAP + 10)
    scan = scanned(json.dumps({"id": long_id}).encode(), "id")
    assert (scan.state, scan.value) == (Scan.FOUND, TOO_LONG)
    assert len(scan._buffer) <= VALUE_CAP + 1
    assert scanned(b'{"id": ' + b"1" * (VALUE_CAP + 5) + b"}", "id").value is TOO_LONG
    # A long key is skipped without being kept.
    assert scanned(json.dumps({"k" * 100_000: 1, "id": "j"}).encode(), "id").value == "j"
    assert scanned(b'{"id": {"nested": 1}}', "id").value is CONTAINER


def test_a_utf8_bom_is_taken_as_json_loads_takes_it() -> None:
    assert scanned(b'\xef\xbb\xbf{"id": "b"}', "id").value == "b"


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=200) | st.text(alphabet='{}[]",:\\ 0a-tnul', max_size=80).map(str.encode),
       path=st.sampled_from(["id", "a.0", "0"]), seed=st.integers(0, 2**32))
def test_any_bytes_give_an_answer_and_never_an_exception(body: bytes, path: str, seed: int) -> None:
    scan = scanned(body, path, split(body, random.Random(seed)))
    assert scan.state is not Scan.SCANNING
    try:
        document = json.loads(body, object_pairs_hook=_unique)
    except (ValueError, RecursionError):  # not JSON, or a key twice (the first one wins here)
        return
    if scan.state in (Scan.FOUND, Scan.ABSENT):  # a valid document is never misread
        want = expected(document, path)
        assert as_lookup(scan) == want and type(as_lookup(scan)) is type(want)


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    if len({key for key, _ in pairs}) != len(pairs):
        raise ValueError("a key twice")
    return dict(pairs)
