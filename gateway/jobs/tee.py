"""A bounded tee of a JSON response body: the document, once complete, while the bytes go on
to the client unchanged. Pure.

The body is fed chunk by chunk as it is forwarded (gzip and deflate are decoded here, for the
tee only). Up to `limit` decoded bytes are kept; a longer body, another encoding or invalid
JSON gives no document. Completeness is checked cheaply: only when the kept text ends with a
closing bracket is a parse tried, so the answer is known as soon as the chunk that completes
the document arrives, before it is sent on.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

LIMIT = 64 * 1024
_MISSING = object()


class JsonTee:
    def __init__(self, content_encoding: str | None = None, limit: int = LIMIT) -> None:
        self._limit = limit
        self._buffer = bytearray()
        self._failed = False
        self._document: Any = _MISSING
        self._decoder: Any = None
        encoding = (content_encoding or "").strip().lower()
        if encoding in ("gzip", "x-gzip"):
            self._decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            self._decoder = zlib.decompressobj()
        elif encoding not in ("", "identity"):
            self._failed = True  # br, zstd, several codings: not read

    @property
    def done(self) -> bool:
        """True once a document was parsed or the body cannot give one."""
        return self._failed or self._document is not _MISSING

    @property
    def document(self) -> Any:
        """The parsed document, or None."""
        return None if self._document is _MISSING else self._document

    def feed(self, chunk: bytes) -> bool:
        """Take the next body chunk; True when the document is complete with it."""
        if self.done:
            return self._document is not _MISSING
        data = chunk
        if self._decoder is not None:
            try:
                data = self._decoder.decompress(chunk, self._limit - len(self._buffer) + 1)
            except zlib.error:
                self._failed = True
                return False
        self._buffer += data
        if len(self._buffer) > self._limit:
            self._failed = True
            self._buffer.clear()
            return False
        tail = bytes(self._buffer[-64:]).rstrip()
        if tail.endswith((b"}", b"]")):
            self._parse()
        return self._document is not _MISSING

    def finish(self) -> Any:
        """The body ended: parse what was kept (if not done already); the document or None."""
        if not self.done:
            self._parse()
            if self._document is _MISSING:
                self._failed = True
        return self.document

    def _parse(self) -> None:
        try:
            self._document = json.loads(bytes(self._buffer))
        except ValueError:
            return
        self._buffer.clear()


def lookup(document: Any, dotted: str) -> Any:
    """The value at a dotted path (`data.id`; list items by index, `items.0.id`), or None."""
    value = document
    for part in dotted.split("."):
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
        if value is None:
            return None
    return value
