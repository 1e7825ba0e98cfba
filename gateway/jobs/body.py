"""Job answers the gateway must be able to read: what it asks the upstream for, and the scan of
the body it gets. Pure.

A job route's start answer and its status answers are read on the side as they are relayed
(gateway/jobs/tracker.py). The gateway decodes gzip and deflate only, so on those requests it
asks for no other coding: the client's `Accept-Encoding` is narrowed to the codings read here
(an answer in another one would hide the job id, and the client would choose that).
"""

from __future__ import annotations

import zlib
from typing import Any

from gateway.jobs.scan import FieldScan, Scan
from gateway.proxy.upstream import Headers

READABLE_CODINGS = frozenset({b"gzip", b"x-gzip", b"deflate", b"identity"})
# Decoded bytes scanned at most per answer: CPU bounded for a body the field is never found in
# (a compression bomb), far over any status answer (Firecrawl pages its crawl data at 10 MB).
MAX_SCANNED = 64 * 1024 * 1024
_PIECE = 64 * 1024  # decoded at a time: memory bounded whatever the ratio


def readable_accept_encoding(headers: Headers) -> Headers:
    """`headers` with one `Accept-Encoding`: the client's codings that the scan decodes, with
    their q-values, or `identity` when none is left that it accepts (`*`, br and zstd go)."""
    kept: Headers = []
    codings: list[bytes] = []
    for header in headers:
        if header[0].lower() == b"accept-encoding":
            codings.extend(token.strip() for token in header[1].split(b",") if _readable(token))
        else:
            kept.append(header)
    if not any(_accepted(coding) for coding in codings):
        codings = [b"identity"]
    kept.append((b"accept-encoding", b", ".join(codings)))
    return kept


def _readable(token: bytes) -> bool:
    return token.split(b";", 1)[0].strip().lower() in READABLE_CODINGS


def _accepted(token: bytes) -> bool:
    """Not refused by its q-value (`gzip;q=0` refuses gzip)."""
    for parameter in token.split(b";")[1:]:
        name, _, value = parameter.partition(b"=")
        if name.strip().lower() == b"q":
            try:
                return float(value.strip()) > 0
            except ValueError:
                return False
    return True


class BodyScan:
    """`FieldScan` over a body as it is relayed, in its `Content-Encoding` (gzip and deflate are
    decoded here, for the scan only; any other coding is UNREADABLE)."""

    __slots__ = ("scan", "_decoder", "_scanned")

    def __init__(self, path: str, content_encoding: str | None) -> None:
        self.scan = FieldScan(path)
        self._decoder: Any = None
        self._scanned = 0
        coding = (content_encoding or "").strip().lower()
        if coding in ("gzip", "x-gzip"):
            self._decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif coding == "deflate":
            self._decoder = zlib.decompressobj()
        elif coding not in ("", "identity"):
            self.scan.abandon()  # br, zstd, several codings

    @property
    def done(self) -> bool:
        return self.scan.done

    def feed(self, chunk: bytes) -> bool:
        """Scan the next body chunk; True once the answer is known."""
        if self.scan.done:
            return True
        if self._decoder is None:
            return self._scan(chunk)
        data = chunk
        while data and not self.scan.done:
            try:
                piece = self._decoder.decompress(data, _PIECE)
            except zlib.error:
                self.scan.abandon()
                break
            data = self._decoder.unconsumed_tail
            self._scan(piece)
        return self.scan.done

    def finish(self) -> Scan:
        return self.scan.finish()

    def _scan(self, data: bytes) -> bool:
        self._scanned += len(data)
        if self._scanned > MAX_SCANNED:
            self.scan.abandon()
            return True
        return self.scan.feed(data)
