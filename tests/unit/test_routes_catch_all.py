"""A `prefix/**` route with a plain prefix is matched without its regex (routes._below): the
same answer as the regex for any path, and the same routing decisions for a whole table."""

from __future__ import annotations

import re

from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.admission.routes import RouteTable, _below, _matcher, _pattern_regex
from gateway.config.model import Route

# Paths built from the characters that matter to the patterns: separators, dots, braces, the
# newline the regex's `.` does not match, other control and non-ASCII characters.
PATH_CHARS = st.sampled_from(["/", "v1", "v", "1", "x", ".", "\n", "\r", "{", "}", "*", "é", "\x00", " ", "%2F", "a/b"])
PATHS = st.lists(PATH_CHARS, max_size=10).map("".join)
PREFIXES = st.sampled_from(["", "/v1", "/v1/x", "/a.b", "/v1/v1", "/é", "/*"])


@settings(max_examples=2000)
@given(PREFIXES, PATHS)
@example("/v1", "/v1")
@example("/v1", "/v1/")
@example("/v1", "/v1/a\nb")
@example("/v1", "/v1\n")
@example("/v1", "/v1x")
@example("", "")
@example("", "/\n")
def test_the_catch_all_without_regex_answers_as_the_regex(prefix: str, path: str) -> None:
    regex = _pattern_regex(prefix + "/**")
    assert regex is not None
    assert _below(prefix)(path) == (regex.fullmatch(path) is not None)
    assert _matcher(prefix + "/**") is not regex.fullmatch  # the fast path is the one in use
    assert bool(_matcher(prefix + "/**")(path)) == (regex.fullmatch(path) is not None)


def reference_match(routes: list[Route], path: str, method: str) -> tuple[int, Route] | None:
    """The table's decision with every pattern through its regex, as before the fast path."""
    if "." in path and re.search(r"(^|/)\.{1,2}(/|$)", path):
        return None
    for index, route in enumerate(routes):
        regex = _pattern_regex(route.path)
        matched = route.path == path if regex is None else regex.fullmatch(path) is not None
        if (route.methods is None or method in route.methods) and matched:
            return index, route
    return None


ROUTES = [
    Route("/v1/crawl", frozenset({"POST"}), ()),
    Route("/v1/crawl/{id}", None, ()),
    Route("/v1/x/**", frozenset({"GET"}), ()),
    Route("/v1/{id}/**", None, ()),
    Route("/v1/**", frozenset({"GET", "POST"}), ()),
    Route("/**", None, ()),
]


@settings(max_examples=2000)
@given(PATHS, st.sampled_from(["GET", "POST", "DELETE"]))
def test_a_table_decides_as_with_regexes_only(path: str, method: str) -> None:
    for routes in (ROUTES, ROUTES[:-1]):
        assert RouteTable(routes).match(path, method) == reference_match(routes, path, method)
