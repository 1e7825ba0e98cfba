"""The route table, compiled once per config: first match wins.

Patterns: an exact path; `{name}` matches one non-empty segment; a final `/**` matches any
suffix, including none (`/v1/**` matches `/v1` and `/v1/a/b`). Paths with `.` or `..`
segments match nothing: upstreams may normalise them, and a route must not be escapable.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.config.model import Route

_DOT_SEGMENT = re.compile(r"(^|/)\.{1,2}(/|$)")


@dataclass(frozen=True, slots=True)
class _Compiled:
    route: Route
    index: int
    exact: str | None  # plain paths compare as strings; patterns use the regex
    regex: re.Pattern[str] | None

    def matches_path(self, path: str) -> bool:
        if self.exact is not None:
            return path == self.exact
        return self.regex is not None and self.regex.fullmatch(path) is not None


def _segments_regex(pattern: str) -> str:
    return "/".join(
        "[^/]+" if seg.startswith("{") and seg.endswith("}") else re.escape(seg) for seg in pattern.split("/")
    )


def _compile(route: Route, index: int) -> _Compiled:
    path = route.path
    if path.endswith("/**"):
        return _Compiled(route, index, None, re.compile(_segments_regex(path[:-3]) + "(?:/.*)?"))
    if "{" in path:
        return _Compiled(route, index, None, re.compile(_segments_regex(path)))
    return _Compiled(route, index, path, None)


class RouteTable:
    def __init__(self, routes: Sequence[Route]) -> None:
        self._routes = tuple(_compile(route, i) for i, route in enumerate(routes))

    def match(self, path: str, method: str) -> tuple[int, Route] | None:
        """The first route whose path and methods match, with its index; None if none."""
        if "." in path and _DOT_SEGMENT.search(path):
            return None
        for compiled in self._routes:
            methods = compiled.route.methods
            if (methods is None or method in methods) and compiled.matches_path(path):
                return compiled.index, compiled.route
        return None
