"""The unreachable-route check and the bounds that keep it fast (probe-config finding 2).

The check used to compare every route with every earlier one (20,000 routes: 158 s). It now
looks each route up in an index of the routes before it; these tests hold it to the pairwise
definition it replaced (kept below as the reference) and to a bounded amount of work. Timing
goals are the benchmark's business, not these tests'.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gateway.config.routes as routes_module
from gateway.config.loader import ConfigError, load_config_text
from tests.support.config_texts import minimal_config

HEAD = minimal_config(routes="")
FIRST_ROUTE_LINE = HEAD.count("\n") + 1
UNREACHABLE = re.compile(r"routes\[(\d+)\]: unreachable: routes\[(\d+)\] ")


def config(routes: list[tuple[str, frozenset[str] | None]]) -> str:
    """One route a line, so route i is on line FIRST_ROUTE_LINE + i."""
    lines = [
        f"  - {{path: '{path}'}}\n" if methods is None
        else f"  - {{path: '{path}', methods: [{', '.join(sorted(methods))}]}}\n"
        for path, methods in routes
    ]
    return HEAD + "".join(lines)


def problems_of(text: str) -> list[str]:
    try:
        load_config_text(text, "t.yaml")
    except ConfigError as exc:
        return exc.problems
    return []


# -- the reference: the pairwise definition the index replaced ---------------------------------

_PARAM = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*\}")


def shadows(earlier: tuple[str, frozenset[str] | None], later: tuple[str, frozenset[str] | None]) -> bool:
    """True when every request `later` matches is matched by `earlier` first (the old code)."""
    (earlier_path, earlier_methods), (later_path, later_methods) = earlier, later
    if earlier_methods is not None and (later_methods is None or not later_methods <= earlier_methods):
        return False
    return _covers(earlier_path[1:].split("/"), later_path[1:].split("/"))


def _covers(outer: list[str], inner: list[str]) -> bool:
    for position, segment in enumerate(outer):
        if segment == "**":
            return True
        if position >= len(inner) or inner[position] == "**":
            return False
        if _PARAM.fullmatch(segment) and inner[position] != "":
            continue
        if inner[position] != segment:
            return False
    return len(outer) == len(inner)


def pairwise_unreachable(routes: list[tuple[str, frozenset[str] | None]]) -> list[tuple[int, int]]:
    """(route, the first earlier route that shadows it), as the old check found them."""
    found = []
    for position, route in enumerate(routes):
        first = next((earlier for earlier in range(position) if shadows(routes[earlier], route)), None)
        if first is not None:
            found.append((position, first))
    return found


# -- the same answers as the pairwise definition ------------------------------------------------

# Few distinct values, so that routes often cover one another: literals, {name}s (two names, so
# that a {name} covers a {name} of another name), the empty last segment (a trailing /), /**.
_MIDDLE = st.sampled_from(["a", "b", "{x}", "{y}"])
_LAST = st.sampled_from(["a", "b", "{z}", "", "**"])


@st.composite
def patterns(draw: st.DrawFn) -> str:
    middle = draw(st.lists(_MIDDLE, max_size=3))
    # a {name} may appear once in a pattern: number them by depth
    segments = [f"{{{s[1]}{depth}}}" if s.startswith("{") else s for depth, s in enumerate(middle)]
    last = draw(st.one_of(st.none(), _LAST))
    if last is not None or not segments:
        segments.append(last if last is not None else "")
    return "/" + "/".join(segments)


_METHODS = st.one_of(st.none(), st.frozensets(st.sampled_from(["GET", "POST", "HEAD"]), min_size=1))
ROUTE_SETS = st.lists(st.tuples(patterns(), _METHODS), min_size=1, max_size=12)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ROUTE_SETS)
def test_the_check_finds_exactly_what_the_pairwise_definition_finds(
    routes: list[tuple[str, frozenset[str] | None]],
) -> None:
    assert all(routes_module.pattern_problem(path) is None for path, _ in routes)
    found = [
        (int(match[1]), int(match[2]))
        for problem in problems_of(config(routes))
        if (match := UNREACHABLE.search(problem))
    ]
    assert found == pairwise_unreachable(routes)


def test_of_several_earlier_routes_that_cover_a_route_the_first_is_named() -> None:
    routes: list[tuple[str, frozenset[str] | None]] = [
        ("/v1/a", frozenset({"GET"})),
        ("/v1/{id}", None),
        ("/v1/**", None),
        ("/v1/a", frozenset({"GET"})),  # covered by all three: the first is named
        ("/v1/b/c", None),  # only /v1/** covers it
        ("/v1/b/c", frozenset({"POST"})),  # covered by 2 and by 4 (itself unreachable): 2 is named
    ]
    line = FIRST_ROUTE_LINE
    assert problems_of(config(routes)) == [
        f"t.yaml:{line + 3}: routes[3]: unreachable: routes[0] (GET /v1/a) matches every request it would",
        f"t.yaml:{line + 4}: routes[4]: unreachable: routes[2] (/v1/**, any method) matches every request it would",
        f"t.yaml:{line + 5}: routes[5]: unreachable: routes[2] (/v1/**, any method) matches every request it would",
    ]
    assert pairwise_unreachable(routes) == [(3, 0), (4, 2), (5, 2)]


# -- the bounds: at most 1,000 routes, each at most 1,024 characters ---------------------------


def worst_case_routes(count: int) -> list[tuple[str, frozenset[str] | None]]:
    """Routes that kept the pairwise check busiest: one long shared prefix of {name}s and
    literals, then /** or a {name}, and no route covering another (each pair walked to the end)."""
    routes: list[tuple[str, frozenset[str] | None]] = []
    for i in range(count):
        prefix = "/v1" + "".join(f"/{{p{depth}}}" if (i >> depth) & 1 else "/a" for depth in range(8))
        routes.append((f"{prefix}/x{i}/**" if i % 2 else f"{prefix}/y{i}/{{id}}", frozenset({"GET"})))
    return routes


def test_more_than_1000_routes_are_refused_at_the_routes_list() -> None:
    text = config([(f"/r{i}", None) for i in range(1001)])
    assert problems_of(text) == [f"t.yaml:{FIRST_ROUTE_LINE}: routes: has 1001 routes; at most 1000"]


def test_1000_routes_of_the_worst_shapes_load_each_route_split_twice_and_looked_up_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No work per pair of routes: each route's pattern is split once to add it to the index
    and once to look it up (the old check split both patterns of every pair: 500,000 pairs)."""
    splits: list[str] = []
    split = routes_module._segments

    def counting(pattern: str) -> list[str]:
        splits.append(pattern)
        return split(pattern)

    monkeypatch.setattr(routes_module, "_segments", counting)
    routes = worst_case_routes(1000)
    assert pairwise_unreachable(routes) == []
    config_loaded = load_config_text(config(routes), "t.yaml")
    assert len(config_loaded.routes) == 1000
    assert sorted(splits) == sorted([path for path, _ in routes] * 2)


def test_a_route_pattern_longer_than_1024_characters_is_refused() -> None:
    fits, too_long = "/" + "a" * 1023, "/" + "a/" * 512
    assert problems_of(config([(fits, None)])) == []
    shown = '"' + too_long[:80] + '…" (1025 characters)'
    assert problems_of(config([(too_long, None)])) == [
        f"t.yaml:{FIRST_ROUTE_LINE}: routes[0].path: {shown} is not a route pattern: it is longer than 1024 characters"
    ]
