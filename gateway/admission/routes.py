"""The route table, compiled once per config: first match wins.

Patterns: an exact path; `{name}` matches one non-empty segment; a final `/**` matches any
suffix, including none (`/v1/**` matches `/v1` and `/v1/a/b`). Paths with `.` or `..`
segments match nothing: upstreams may normalise them, and a route must not be escapable.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gateway.config.model import Route

_DOT_SEGMENT = re.compile(r"(^|/)\.{1,2}(/|$)")


@dataclass(frozen=True, slots=True)
class _Compiled:
    route: Route
    index: int
    matches: Callable[[str], object]  # path -> truthy when the route's pattern matches it
    found: tuple[int, Route]  # what `match` returns for this route


def _segments_regex(pattern: str) -> str:
    return "/".join(
        "[^/]+" if seg.startswith("{") and seg.endswith("}") else re.escape(seg) for seg in pattern.split("/")
    )


def _pattern_regex(path: str) -> re.Pattern[str] | None:
    """The regex of a pattern with `{name}` segments or a final `/**`; None for a plain path."""
    if path.endswith("/**"):
        return re.compile(_segments_regex(path[:-3]) + "(?:/.*)?")
    if "{" in path:
        return re.compile(_segments_regex(path))
    return None


def _below(prefix: str) -> Callable[[str], bool]:
    """`prefix/**` with a plain prefix, without the regex: the prefix itself, or the prefix, a
    `/` and a suffix without a newline (the regex's `.` matches any character but a newline)."""
    below = prefix + "/"

    def matches(path: str) -> bool:
        return path == prefix or (path.startswith(below) and "\n" not in path)

    return matches


def _matcher(path: str) -> Callable[[str], object]:
    regex = _pattern_regex(path)
    if regex is None:
        return path.__eq__  # plain paths compare as strings
    prefix = path[:-3]
    if path.endswith("/**") and "{" not in prefix and "\n" not in prefix:
        return _below(prefix)  # the common catch-all: the same answers as the regex, in a fraction of its time
    return regex.fullmatch


def _compile(route: Route, index: int) -> _Compiled:
    return _Compiled(route, index, _matcher(route.path), (index, route))


class RouteTable:
    def __init__(self, routes: Sequence[Route]) -> None:
        self._routes = tuple(_compile(route, i) for i, route in enumerate(routes))

    def match(self, path: str, method: str) -> tuple[int, Route] | None:
        """The first route whose path and methods match, with its index; None if none."""
        if "." in path and _DOT_SEGMENT.search(path):
            return None
        for compiled in self._routes:
            methods = compiled.route.methods
            if (methods is None or method in methods) and compiled.matches(path):
                return compiled.found
        return None
