"""Strict request paths: forms that some upstream reads as traversal or as a different path.

The gateway forwards the path byte for byte, but the upstream (or a proxy, framework or file
server behind it) decodes it again, each in its own way: Tomcat and Spring drop `;params`
(`/..;/`), IIS and Windows treat `\\` as `/`, old decoders accept overlong UTF-8 (`%c0%ae` is
`.`), some servers decode twice (`%252e` → `%2e` → `.`), and C code stops at NUL. A route such as
`/v1/**` then admits a request that lands on `/admin`. So a path is refused (400
`bad_request`) when, raw or after any number of percent-decodings, it holds:

- a control byte (NUL, CR, LF, any other below 0x20, DEL);
- a backslash;
- a `.` or `..` segment, also with a `;` parameter (`..;x`), or made by decoding (`%2e%2e`,
  `..%2f`, `%252e%252e`);
- an overlong UTF-8 sequence (lead byte C0 or C1; E0 followed by 80–9F; F0 by 80–8F).

Only the path is checked: the query is the client's business (a scraping API takes whole URLs
there, `?url=https%3A%2F%2Fexample.com%2Fa%2F..%2Fb`). Pure and cheap: an ASCII path without
`%`, `.` or `\\` (most of them) is decided by a few byte searches and one for control bytes.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_to_bytes

_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
_OVERLONG = re.compile(rb"[\xc0\xc1]|\xe0[\x80-\x9f]|\xf0[\x80-\x8f]")
_DOT_SEGMENTS = (b".", b"..")
# Decodings tried at most; a path still changing after them is refused as well.
MAX_DECODINGS = 4


def path_problem(raw_path: bytes) -> str | None:
    """Why `raw_path` (the request path, without the query) must not be forwarded, or None."""
    if b"%" not in raw_path and b"." not in raw_path and b"\\" not in raw_path and raw_path.isascii():
        return "a control byte" if _CONTROL.search(raw_path) else None
    level = raw_path
    for _ in range(MAX_DECODINGS):
        problem = _level_problem(level)
        if problem is not None:
            return problem
        if b"%" not in level:
            return None
        decoded = unquote_to_bytes(level)
        if decoded == level:
            return None
        level = decoded
    return _level_problem(level) or "percent-encoded too many times"


def _level_problem(path: bytes) -> str | None:
    if b"\\" in path:
        return "a backslash"
    if _CONTROL.search(path):
        return "a control byte"
    if b"." in path and any(segment.split(b";", 1)[0] in _DOT_SEGMENTS for segment in path.split(b"/")):
        return "a dot segment"
    if _OVERLONG.search(path):
        return "overlong UTF-8"
    return None
