"""Read values out of composed YAML nodes, with line numbers, interpolation and every problem kept.

`NodeReader` is the loader's one tool: each method takes a node and its dotted path, returns the
value (or None after recording a problem as `FILE:LINE: path: problem`), so a section reader can
go on and report the next problem instead of stopping at the first. Nothing here builds Python
objects from YAML tags: scalars are read as the text written, so `!!python/...` is only a tag
to refuse.

Interpolation happens when a scalar value is read (see `gateway.config.loader` for the rules).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import yaml

from gateway.config.units import UnitError, parse_duration, parse_int, quote

T = TypeVar("T")
Choice = TypeVar("Choice", bound=str)
Node = yaml.Node
Entries = dict[str, tuple[Node, Node]]  # key -> (key node, value node), in file order

STD = "tag:yaml.org,2002:"
STR, NULL, MAP, SEQ, MERGE = (STD + t for t in ("str", "null", "map", "seq", "merge"))
_SCALAR_TAGS = frozenset(STD + t for t in ("str", "int", "float", "bool", "null", "timestamp"))
OVERRIDE_SOURCE = "<override>"  # Mark.name of nodes made from command-line overrides

NULL_TEXT = re.compile(r"~|null|Null|NULL|")
_TRUE = frozenset({"true", "True", "TRUE", "yes", "Yes", "YES", "on", "On", "ON"})
_FALSE = frozenset({"false", "False", "FALSE", "no", "No", "NO", "off", "Off", "OFF"})
_VARIABLE = re.compile(r"\$\$\{|\$\{(?P<body>[^}]*)(?P<close>\}?)")
_VARIABLE_BODY = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>.*))?", re.DOTALL)
_INTEGER = re.compile(r"[-+]?[0-9]+")
_NUMBER = re.compile(r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")
_MAX_INT = 2**53 - 1

# Ids, workspaces and plan names travel in logs, metrics and upstream headers.
ID = re.compile(r"[\x21-\x7e]{1,128}")
ID_RULE = "must be 1 to 128 printable ASCII characters without spaces"
TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token: header names, methods


@dataclass(frozen=True, slots=True)
class Scalar:
    text: str
    null: bool  # an unquoted empty / `~` / `null`


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""


def describe(node: Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if node.tag == NULL:
        return "nothing"
    return quote(str(node.value))


def _tag_problem(node: Node) -> str | None:
    """A message for a node carrying a tag the loader does not take (`!!python/...`, `!!set`...)."""
    if node.tag in _SCALAR_TAGS or node.tag in (MAP, SEQ):
        return None
    return f"unsupported YAML tag {quote(str(node.tag).replace(STD, '!!'))}"


class NodeReader:
    """Reads values out of YAML nodes, recording a problem (and returning None) when one is wrong."""

    def __init__(self, source: str, env: Mapping[str, str]) -> None:
        self.source = source
        self.env = env
        self._problems: list[tuple[int, int, str]] = []
        self._scalars: dict[int, Scalar | None] = {}

    @property
    def problems(self) -> list[str]:
        ordered = sorted(self._problems)
        return list(dict.fromkeys(text for _, _, text in ordered))

    def problem(self, node: Node, path: str, message: str) -> None:
        mark = node.start_mark
        if mark.name == OVERRIDE_SOURCE:
            line, where = 0, f"{self.source}:override"
        else:
            line = mark.line + 1
            where = f"{self.source}:{line}"
        text = f"{where}: {path}: {message}" if path else f"{where}: {message}"
        self._problems.append((line, len(self._problems), text))

    @property
    def problem_count(self) -> int:
        return len(self._problems)

    def line(self, node: Node) -> int:
        return int(node.start_mark.line) + 1

    # -- containers ------------------------------------------------------------------------

    def mapping(
        self,
        node: Node,
        path: str,
        allowed: Collection[str] | None = None,
        required: Collection[str] = (),
    ) -> Entries | None:
        """The entries of a mapping; unknown keys (when `allowed` is given) are reported and dropped."""
        if not isinstance(node, yaml.MappingNode) or node.tag != MAP:
            self.problem(node, path, _tag_problem(node) or f"must be a mapping, got {describe(node)}")
            return None
        entries = self._entries(node, path, frozenset())
        if allowed is not None:
            for name, (key_node, _) in list(entries.items()):
                if name not in allowed:
                    self.problem(key_node, join(path, name), "unknown key" + did_you_mean(name, allowed))
                    del entries[name]
        for name in required:
            if name not in entries:
                self.problem(node, path, f'"{name}" is required')
        return entries

    def _entries(self, node: yaml.MappingNode, path: str, visiting: frozenset[int]) -> Entries:
        explicit: Entries = {}
        merged: list[yaml.MappingNode] = []
        for key_node, value_node in node.value:
            if key_node.tag == MERGE:
                merged.extend(self._merge_sources(value_node, path))
                continue
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag not in _SCALAR_TAGS:
                self.problem(key_node, path, f"keys must be plain names, got {describe(key_node)}")
                continue
            name = str(key_node.value)
            if name in explicit:
                first = self.line(explicit[name][0])
                self.problem(key_node, join(path, name), f"duplicate key (first at line {first})")
                continue
            explicit[name] = (key_node, value_node)
        inner = visiting | {id(node)}
        for source in merged:
            if id(source) in inner:
                continue
            for name, pair in self._entries(source, path, inner).items():
                explicit.setdefault(name, pair)
        return explicit

    def _merge_sources(self, node: Node, path: str) -> list[yaml.MappingNode]:
        items = node.value if isinstance(node, yaml.SequenceNode) else [node]
        sources = [item for item in items if isinstance(item, yaml.MappingNode)]
        if len(sources) != len(items):
            self.problem(node, path, '"<<" must merge a mapping or a list of mappings')
        return sources

    def sequence(self, node: Node, path: str) -> list[Node] | None:
        if not isinstance(node, yaml.SequenceNode) or node.tag != SEQ:
            self.problem(node, path, _tag_problem(node) or f"must be a list, got {describe(node)}")
            return None
        return list(node.value)

    # -- scalars ---------------------------------------------------------------------------

    def scalar(self, node: Node, path: str) -> Scalar | None:
        key = id(node)
        if key not in self._scalars:
            self._scalars[key] = self._read_scalar(node, path)
        return self._scalars[key]

    def _read_scalar(self, node: Node, path: str) -> Scalar | None:
        if not isinstance(node, yaml.ScalarNode):
            self.problem(node, path, _tag_problem(node) or f"must be a single value, got {describe(node)}")
            return None
        if node.tag not in _SCALAR_TAGS:
            self.problem(node, path, _tag_problem(node) or "unsupported value")
            return None
        text = str(node.value)
        if node.start_mark.name == OVERRIDE_SOURCE or "${" not in text:
            return Scalar(text, node.tag == NULL)
        result = self._interpolate(node, path, text)
        if result is None:
            return None
        null = node.tag == NULL or (not node.style and NULL_TEXT.fullmatch(result) is not None)
        return Scalar(result, null)

    def _interpolate(self, node: Node, path: str, text: str) -> str | None:
        parts: list[str] = []
        position = 0
        ok = True
        for match in _VARIABLE.finditer(text):
            parts.append(text[position : match.start()])
            position = match.end()
            if match.group(0) == "$${":
                parts.append("${")
                continue
            body = match["body"]
            variable = _VARIABLE_BODY.fullmatch(body)
            if not match["close"]:
                self.problem(node, path, f"unterminated variable reference {quote(match.group(0))}")
                ok = False
            elif variable is None:
                self.problem(node, path, f"{quote(match.group(0))} is not ${{VAR}} or ${{VAR:-default}}")
                ok = False
            else:
                value = self.env.get(variable["name"])
                default = variable["default"]
                if default is not None and not value:
                    value = default
                if value is None:
                    name = variable["name"]
                    self.problem(
                        node,
                        path,
                        f"environment variable {name} is not set (${{{name}:-default}} gives a default)",
                    )
                    ok = False
                else:
                    parts.append(value)
        parts.append(text[position:])
        return "".join(parts) if ok else None

    def is_null(self, node: Node, path: str) -> bool:
        value = self.scalar(node, path) if isinstance(node, yaml.ScalarNode) else None
        return value is not None and value.null

    def string(self, node: Node, path: str) -> str | None:
        """A non-empty string; numbers and booleans are taken as written (`workspace: 2024`)."""
        value = self.scalar(node, path)
        if value is None:
            return None
        if value.null or value.text == "":
            self.problem(node, path, "must not be empty")
            return None
        return value.text

    def identifier(self, node: Node, path: str) -> str | None:
        text = self.string(node, path)
        if text is not None and not ID.fullmatch(text):
            self.problem(node, path, f"{quote(text)} {ID_RULE}")
            return None
        return text

    def token(self, node: Node, path: str, what: str = "a header name") -> str | None:
        text = self.string(node, path)
        if text is not None and not TOKEN.fullmatch(text):
            self.problem(node, path, f"{quote(text)} is not {what}")
            return None
        return text

    def choice(self, node: Node, path: str, options: Sequence[Choice]) -> Choice | None:
        text = self.string(node, path)
        for option in options:
            if text == option:
                return option
        if text is not None:
            hint = did_you_mean(text, options)
            self.problem(node, path, f"{quote(text)} is not one of: {', '.join(options)}{hint}")
        return None

    def boolean(self, node: Node, path: str) -> bool | None:
        value = self.scalar(node, path)
        if value is None:
            return None
        if value.text in _TRUE:
            return True
        if value.text in _FALSE:
            return False
        self.problem(node, path, f"must be true or false, got {self._shown(value)}")
        return None

    def integer(self, node: Node, path: str, minimum: int = 1, maximum: int = _MAX_INT) -> int | None:
        value = self.scalar(node, path)
        if value is None:
            return None
        text = value.text.strip()
        if value.null or not _INTEGER.fullmatch(text):
            self.problem(node, path, f"must be an integer, got {self._shown(value)}")
            return None
        number = parse_int(text)
        if number is None:
            self.problem(node, path, f"{_number_shown(text)} is too large")
            return None
        if number < minimum or number > maximum:
            if number > _MAX_INT:
                self.problem(node, path, f"{number} is too large")
            elif maximum != _MAX_INT:
                self.problem(node, path, f"{number} must be between {minimum} and {maximum}")
            elif minimum == 1:
                self.problem(node, path, f"{number} must be greater than 0")
            else:
                self.problem(node, path, f"{number} must be at least {minimum}")
            return None
        return number

    def number(self, node: Node, path: str, minimum: float) -> float | None:
        value = self.scalar(node, path)
        if value is None:
            return None
        text = value.text.strip()
        if value.null or not _NUMBER.fullmatch(text):
            self.problem(node, path, f"must be a number, got {self._shown(value)}")
            return None
        number = float(text)
        if number < minimum:
            self.problem(node, path, f"{_number_shown(text)} must be at least {minimum:g}")
            return None
        if number > _MAX_INT:
            self.problem(node, path, f"{_number_shown(text)} is too large")
            return None
        return number

    def unit(self, node: Node, path: str, parse: Callable[[str], T]) -> T | None:
        """A value in a unit (duration, rate, size, host:port), parsed from its text."""
        text = self.string(node, path)
        if text is None:
            return None
        try:
            return parse(text)
        except UnitError as exc:
            self.problem(node, path, str(exc))
            return None

    def duration(self, node: Node, path: str, allow_zero: bool = False) -> float | None:
        return self.unit(node, path, lambda text: parse_duration(text, allow_zero=allow_zero))

    def list_of(self, node: Node, path: str, read: Callable[[Node, str], T | None]) -> list[T] | None:
        items = self.sequence(node, path)
        if items is None:
            return None
        values = [read(item, f"{path}[{index}]") for index, item in enumerate(items)]
        return [value for value in values if value is not None]

    @staticmethod
    def _shown(value: Scalar) -> str:
        return "nothing" if value.null and value.text in ("", "~") else quote(value.text)


def _number_shown(text: str) -> str:
    """A number as written, unless it is too long to show whole (then quoted and cut)."""
    return text if len(text) <= 20 else quote(text)


def get(entries: Entries | None, name: str) -> Node | None:
    if entries is None or name not in entries:
        return None
    return entries[name][1]


def field(entries: Entries | None, name: str, read: Callable[[Node], T | None], default: T) -> T:
    """The value read from `name` when present and valid, else the default (the problem is recorded)."""
    node = get(entries, name)
    if node is None:
        return default
    value = read(node)
    return default if value is None else value
