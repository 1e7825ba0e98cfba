from __future__ import annotations

import pytest

from gateway.admission.routes import RouteTable
from gateway.config.model import Route

TABLE = RouteTable(
    [
        Route("/v1/crawl", frozenset({"POST"}), ("rpm",)),
        Route("/v1/crawl/{id}", None, ("rpm",)),
        Route("/v1/read", frozenset({"POST"}), ()),
        Route("/v1/**", None, ("rpm", "burst")),
    ]
)


@pytest.mark.parametrize(
    ("path", "method", "index"),
    [
        ("/v1/crawl", "POST", 0),
        ("/v1/crawl", "GET", 3),  # method mismatch: next matching route
        ("/v1/crawl/abc", "DELETE", 1),
        ("/v1/crawl/", "GET", 3),  # {id} needs a non-empty segment
        ("/v1/crawl/a/b", "GET", 3),
        ("/v1/read", "POST", 2),
        ("/v1", "GET", 3),
        ("/v1/", "GET", 3),
        ("/v1x", "GET", None),
        ("/v2/x", "GET", None),
        ("/v1/../admin", "GET", None),
        ("/v1/./crawl", "POST", None),
        ("/v1/a..b", "GET", 3),  # dots inside a segment are fine
    ],
)
def test_first_match_wins(path: str, method: str, index: int | None) -> None:
    match = TABLE.match(path, method)
    assert (match[0] if match else None) == index


def test_catch_all() -> None:
    table = RouteTable([Route("/**", None, ())])
    assert table.match("/", "GET") is not None
    assert table.match("/anything/at/all", "PATCH") is not None


def test_placeholder_inside_prefix_pattern() -> None:
    table = RouteTable([Route("/t/{tenant}/**", None, ())])
    assert table.match("/t/acme", "GET") is not None
    assert table.match("/t/acme/x/y", "GET") is not None
    assert table.match("/t", "GET") is None
