"""Bound what YAML aliases and merge keys can expand to, before anything reads the document.

An alias (`*name`) is a reference, so a few hundred bytes of anchors that each refer to the
previous one ten times (`a9: &a9 {<<: [*a8, *a8, ...]}`) describe a document of 10^9 nodes,
and every reader that walks it as written pays for all of them. This walks the composed node
graph once (each node counted once, its size remembered), so it costs the size of the file,
and refuses:

- a document whose aliases and merge keys add more than `MAX_ALIAS_NODES` nodes to what is
  written (20,000 keys each merging a 3-setting default add about 140,000), reported at the
  collection whose aliases passed the limit.

An alias inside the node it refers to (`&a {b: *a}`) counts once: the readers follow the
schema, which is finite, not the loop.
"""

from __future__ import annotations

import yaml

MAX_ALIAS_NODES = 1_000_000


class ExpansionError(Exception):
    """The document expands too far; `line` is where (1-based), the message fits after `FILE:LINE: `."""

    def __init__(self, line: int, message: str) -> None:
        self.line = line
        super().__init__(message)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def check_expansion(root: yaml.Node, limit: int = MAX_ALIAS_NODES) -> None:
    """Raise ExpansionError when the document as read (aliases copied out) is too large.

    Iterative (a deep document must not exhaust the interpreter's stack here); `sizes` holds the
    expanded size of every node already measured, so a node referred to many times is measured
    once and each further reference costs one addition.
    """
    sizes: dict[int, int] = {}
    written = 0  # distinct nodes: what the file spells out
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            on_path.discard(key)
            children = _children(node)
            # a child still on the path is an alias to an enclosing node: the readers follow
            # such a loop only as deep as the schema goes, so it counts as one reference
            size = 1 + sum(sizes.get(id(child), 1) for child in children)
            sizes[key] = size
            if size - written > limit:
                raise ExpansionError(
                    node.start_mark.line + 1,
                    f"aliases and merge keys expand the document past {limit:,} extra nodes; "
                    "write the values out or merge less",
                )
            continue
        if key in sizes:
            continue
        on_path.add(key)
        written += 1
        stack.append((node, True))
        for child in reversed(_children(node)):
            if id(child) not in sizes and id(child) not in on_path:
                stack.append((child, False))
