"""The `routes:` section: path patterns, methods, the limits each route applies, async jobs.

Patterns are exact (`/v1/read`), take `{name}` for one segment (`/v1/crawl/{id}`), or end in
`/**` for any suffix, none included (`/v1/**` matches `/v1` and `/v1/a/b`). The first match
wins, so a route that an earlier one already matches entirely is reported as unreachable.
A route's `cost` rules are read and checked in gateway/config/cost_rules.py.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import yaml

from gateway.config.cost_rules import check_route_costs, lowest_overrides, read_cost_rules
from gateway.config.model import ConcurrencyLimit, Job, Key, Route
from gateway.config.nodes import Node, NodeReader, did_you_mean, field, get
from gateway.config.plans import PlanIndex, kind_name
from gateway.config.units import quote

_PARAM = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*\}")
_BAD_SEGMENT = re.compile(r"[{}*?#\s\x00-\x1f\x7f]")
DEFAULT_DONE = ("completed", "failed", "cancelled")
DEFAULT_JOB_MAX_DURATION = 7200.0


# Real scraping APIs list tens of routes; the bound keeps the loader and the request-time scan
# (gateway/admission/routes.py, first match wins) short, as cost rules' 64 does.
MAX_ROUTES = 1000


def read_routes(r: NodeReader, node: Node, index: PlanIndex, keys: Sequence[Key] = ()) -> tuple[Route, ...]:
    """The routes; `keys` (already read) let cost rules be checked against key overrides."""
    items = r.sequence(node, "routes")
    if items is None:
        return ()
    if not items:
        r.problem(node, "routes", "must list at least one route")
    if len(items) > MAX_ROUTES:
        r.problem(node, "routes", f"has {len(items)} routes; at most {MAX_ROUTES}")
        return ()
    read = _ReadRoutes()
    overrides = lowest_overrides(keys)
    for position, item in enumerate(items):
        path = f"routes[{position}]"
        route = _route(r, item, path, index, overrides)
        if route is None:
            continue
        shadowing = read.first_shadowing(route)
        if shadowing is not None:
            earlier_position, earlier = shadowing
            first = f"routes[{earlier_position}] ({_describe(earlier)})"
            r.problem(item, path, f"unreachable: {first} matches every request it would")
        read.add(position, route)
    return read.routes()


def _route(
    r: NodeReader, node: Node, path: str, index: PlanIndex, overrides: dict[tuple[str, str], tuple[int, str]]
) -> Route | None:
    allowed = ("path", "methods", "limits", "per_route", "job", "cost")
    m = r.mapping(node, path, allowed, required=("path",))
    if m is None:
        return None
    pattern = field(m, "path", lambda n: _pattern(r, n, f"{path}.path"), None)
    methods = field(m, "methods", lambda n: _methods(r, n, f"{path}.methods"), None)
    limits: list[str] = field(m, "limits", lambda n: _limit_names(r, n, f"{path}.limits", index), [])
    job = field(m, "job", lambda n: _job(r, n, f"{path}.job", index, limits), None)
    held = set(limits) | ({job.limit} if job is not None else set())
    per_route: frozenset[str] = field(
        m, "per_route", lambda n: _per_route(r, n, f"{path}.per_route", held), frozenset()
    )
    cost_node = get(m, "cost")
    rules = read_cost_rules(r, cost_node, f"{path}.cost", methods) if cost_node is not None else None
    if pattern is None:
        return None
    route = Route(
        path=pattern, methods=methods, limits=tuple(limits), per_route=per_route, job=job,
        cost=tuple(read.rule for read in rules or ()),
    )
    if index.readable and index.limits_readable:
        check_route_costs(r, route, node, path, rules or (), index.plans, overrides)
    return route


# As `usage_path`: real patterns are tens of characters, and this bounds the segments the
# unreachable-route check walks (1,000 routes of 1,024 characters: about 0.4 s).
MAX_PATTERN = 1024


def _pattern(r: NodeReader, node: Node, path: str) -> str | None:
    text = r.string(node, path)
    if text is None:
        return None
    too_long = len(text) > MAX_PATTERN
    reason = f"it is longer than {MAX_PATTERN} characters" if too_long else pattern_problem(text)
    if reason is not None:
        r.problem(node, path, f"{quote(text)} is not a route pattern: {reason}")
        return None
    return text


def pattern_problem(text: str) -> str | None:
    """Why `text` is not a route pattern, or None when it is one."""
    if not text.startswith("/"):
        return "it must start with /"
    segments = text[1:].split("/")
    names: set[str] = set()
    for position, segment in enumerate(segments):
        last = position == len(segments) - 1
        if segment == "**":
            if not last:
                return "** may only be the last segment, as in /v1/**"
        elif segment == "":
            if not last:
                return "it has an empty segment (//)"
        elif _PARAM.fullmatch(segment):
            if segment in names:
                return f"{segment} appears twice"
            names.add(segment)
        elif segment in (".", "..") or "\\" in segment:
            # Requests with these are refused (400) before routing: such a route never matches.
            return f"bad segment {quote(segment)}: a request path with it is refused, so it would match nothing"
        elif _BAD_SEGMENT.search(segment) or not segment.isascii():
            return (
                f"bad segment {quote(segment)} (use /literal, /{{name}} for one segment, "
                "or a final /** for any suffix)"
            )
    return None


# RFC 9110's methods and PATCH (RFC 5789): a typo such as GTE would otherwise make a route
# that matches nothing, silently.
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")


def _method(r: NodeReader, item: Node, path: str) -> str | None:
    token = r.token(item, path, "an HTTP method")
    if token is None:
        return None
    if token.upper() not in HTTP_METHODS:
        r.problem(item, path, f"{quote(token)} is not an HTTP method{did_you_mean(token.upper(), HTTP_METHODS)}; "
                  f"one of: {', '.join(HTTP_METHODS)}")
        return None
    return token


def read_method(r: NodeReader, node: Node, path: str) -> str | None:
    """One HTTP method, upper-cased."""
    method = _method(r, node, path)
    return None if method is None else method.upper()


def _methods(r: NodeReader, node: Node, path: str) -> frozenset[str] | None:
    methods = r.list_of(node, path, lambda item, item_path: _method(r, item, item_path))
    if methods is None:
        return None
    if isinstance(node, yaml.SequenceNode) and not node.value:
        r.problem(node, path, "must not be empty (leave it out to allow every method)")
        return None
    return frozenset(method.upper() for method in methods)


def _limit_names(r: NodeReader, node: Node, path: str, index: PlanIndex) -> list[str] | None:
    items = r.sequence(node, path)
    if items is None:
        return None
    names: list[str] = []
    for position, item in enumerate(items):
        item_path = f"{path}[{position}]"
        name = r.string(item, item_path)
        if name is None:
            continue
        if not index.defines_limit(name):
            r.problem(
                item, item_path, f"no plan defines a limit {quote(name)}{did_you_mean(name, index.kinds)}"
            )
        elif name in names:
            r.problem(item, item_path, f"{quote(name)} is listed twice")
        else:
            names.append(name)
    return names


def _per_route(r: NodeReader, node: Node, path: str, held: set[str]) -> frozenset[str] | None:
    items = r.sequence(node, path)
    if items is None:
        return None
    names: set[str] = set()
    for position, item in enumerate(items):
        item_path = f"{path}[{position}]"
        name = r.string(item, item_path)
        if name is not None and name not in held:
            r.problem(
                item, item_path, f"{quote(name)} is not one of this route's limits (or its job's limit)"
            )
        elif name is not None:
            names.add(name)
    return frozenset(names)


def _job(r: NodeReader, node: Node, path: str, index: PlanIndex, route_limits: list[str]) -> Job | None:
    allowed = ("limit", "id", "status_path", "status_field", "done", "max_duration")
    m = r.mapping(node, path, allowed, required=("limit", "id", "status_path"))
    if m is None:
        return None
    limit = field(m, "limit", lambda n: _job_limit(r, n, f"{path}.limit", index, route_limits), None)
    id_path = field(m, "id", lambda n: _dotted(r, n, f"{path}.id"), None)
    status_path = field(m, "status_path", lambda n: _status_path(r, n, f"{path}.status_path"), None)
    status_field = field(m, "status_field", lambda n: _dotted(r, n, f"{path}.status_field"), "status")
    done: tuple[str, ...] = field(m, "done", lambda n: _done(r, n, f"{path}.done"), DEFAULT_DONE)
    max_duration = field(
        m, "max_duration", lambda n: r.duration(n, f"{path}.max_duration"), DEFAULT_JOB_MAX_DURATION
    )
    if limit is None or id_path is None or status_path is None:
        return None
    return Job(
        limit=limit,
        id_path=id_path,
        status_path=status_path,
        status_field=status_field,
        done=done,
        max_duration=max_duration,
    )


def _job_limit(r: NodeReader, node: Node, path: str, index: PlanIndex, route_limits: list[str]) -> str | None:
    name = r.string(node, path)
    if name is None:
        return None
    if not index.defines_limit(name):
        r.problem(node, path, f"no plan defines a limit {quote(name)}{did_you_mean(name, index.kinds)}")
        return None
    kind = index.kinds.get(name)
    if kind is not None and kind is not ConcurrencyLimit:
        r.problem(node, path, f"{quote(name)} is a {kind_name(kind)} limit; a job holds a concurrency limit")
        return None
    if name in route_limits:
        r.problem(node, path, f"{quote(name)} is also in the route's limits; the job already takes its slot")
        return None
    return name


def _done(r: NodeReader, node: Node, path: str) -> tuple[str, ...] | None:
    values = r.list_of(node, path, r.string)
    if values is None:
        return None
    if not values and isinstance(node, yaml.SequenceNode) and not node.value:
        r.problem(node, path, "must list at least one status")
        return None
    return tuple(values)


def _dotted(r: NodeReader, node: Node, path: str) -> str | None:
    text = r.string(node, path)
    if text is not None and any(part.strip() == "" for part in text.split(".")):
        r.problem(node, path, f"{quote(text)} is not a dotted path (e.g. data.id)")
        return None
    return text


def _status_path(r: NodeReader, node: Node, path: str) -> str | None:
    text = r.string(node, path)
    if text is None:
        return None
    if not text.startswith("/") or "{id}" not in text:
        r.problem(node, path, f"{quote(text)} must start with / and contain {{id}}, e.g. /v1/crawl/{{id}}")
        return None
    if re.search(r"[?#\s\x00-\x1f\x7f]", text):
        r.problem(node, path, f"{quote(text)} must not contain spaces, '?' or '#'")
        return None
    braces = _status_path_braces_problem(text)
    if braces is not None:
        r.problem(node, path, f"{quote(text)} {braces}")
        return None
    return text


def _status_path_braces_problem(text: str) -> str | None:
    """What is wrong with the braces of a status path: `{id}` exactly once (within a segment
    too: `/v1/crawl/{id}.json`), any other `{name}` a whole segment. (A path that passed and
    never matched held every job's slot until `max_duration`; `{id}` twice crashed the start.)"""
    if text.count("{id}") != 1:
        return "must contain {id} exactly once"
    for segment in text[1:].split("/"):
        rest = segment.replace("{id}", "", 1)
        if ("{" in rest or "}" in rest) and not (rest == segment and _PARAM.fullmatch(segment)):
            return f"has {quote(segment)}: a {{name}} is a whole segment, and {{id}} the only one inside one"
    return None


def _describe(route: Route) -> str:
    if route.methods is None:
        return f"{route.path}, any method"
    return f"{','.join(sorted(route.methods))} {route.path}"


def _segments(pattern: str) -> list[str]:
    return pattern[1:].split("/")


def _is_param(segment: str) -> bool:
    return segment.startswith("{")  # a checked pattern has `{` only in a whole `{name}` segment


class _ReadRoutes:
    """The routes read so far, indexed to find the first one that shadows a new route: one
    step per segment of the new route, never a comparison with each earlier route (that was
    quadratic: 20,000 routes took 158 s).

    An earlier route covers a new one when each of its segments before its end or its final
    `/**` matches the new route's segment at the same depth (the same literal; or a `{name}`,
    which matches any segment but an empty one or `**`), and it ends where the new route does
    or with `/**` (which covers any rest, none and a `/**` too).

    Each route read is one bit of an int (bit i: the i-th route read). Per depth, a mask of
    the routes whose segment there is a given literal, and one of those with a `{name}` there;
    by segment count, the routes that end there and those whose `/**` comes there. Walking the
    new route's segments ANDs the masks, and the lowest bit left among the routes that also
    take all its methods is the first one that shadows it.
    """

    def __init__(self) -> None:
        self._read: list[tuple[int, Route]] = []  # (position in the file, route), by bit
        self._literal: list[dict[str, int]] = []  # by depth: segment -> routes with it there
        self._param: list[int] = []  # by depth: routes with a {name} there
        self._ends: dict[int, int] = {}  # segment count -> routes of exactly that many, no /**
        self._below: dict[int, int] = {}  # segment count before a final /** -> those routes
        self._any_method = 0
        self._with_method: dict[str, int] = {}

    def routes(self) -> tuple[Route, ...]:
        return tuple(route for _, route in self._read)

    def add(self, position: int, route: Route) -> None:
        bit = 1 << len(self._read)
        self._read.append((position, route))
        segments = _segments(route.path)
        ends = self._ends
        if segments[-1] == "**":
            segments.pop()
            ends = self._below
        ends[len(segments)] = ends.get(len(segments), 0) | bit
        literal, param = self._literal, self._param
        while len(param) < len(segments):
            literal.append({})
            param.append(0)
        for depth, segment in enumerate(segments):
            if _is_param(segment):
                param[depth] |= bit
            else:
                literal[depth][segment] = literal[depth].get(segment, 0) | bit
        if route.methods is None:
            self._any_method |= bit
        for method in route.methods or ():
            self._with_method[method] = self._with_method.get(method, 0) | bit

    def first_shadowing(self, route: Route) -> tuple[int, Route] | None:
        """The first route read that matches every request `route` matches, with its position."""
        found = self._covering(_segments(route.path)) & self._taking(route.methods)
        if not found:
            return None
        return self._read[(found & -found).bit_length() - 1]

    def _covering(self, segments: list[str]) -> int:
        """The routes whose pattern matches every path the pattern of `segments` matches."""
        alive = (1 << len(self._read)) - 1  # routes whose first `depth` segments cover these
        found = 0
        literal, param, below = self._literal, self._param, self._below
        for depth, segment in enumerate(segments):
            if depth in below:
                found |= alive & below[depth]
            if segment == "**" or depth == len(param):
                return found  # only a /** covers a /**; and no route reaches this deep
            alive &= literal[depth].get(segment, 0) | (param[depth] if segment else 0)
            if not alive:
                return found
        count = len(segments)
        return found | alive & (self._below.get(count, 0) | self._ends.get(count, 0))

    def _taking(self, methods: frozenset[str] | None) -> int:
        """The routes that take every method of `methods` (None: any method)."""
        if methods is None:
            return self._any_method
        taking = (1 << len(self._read)) - 1
        for method in methods:
            taking &= self._with_method.get(method, 0) | self._any_method
        return taking
