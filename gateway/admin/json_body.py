"""The JSON body of an admin request: received within `client_timeout`, at most `limit` bytes,
parsed strictly. (Its `Content-Type` was checked before routing: gateway/admin/cross_site.py.)

A client that declares a body and never sends it gets 408 `request_timeout` and its
connection closed, as on the public port; otherwise a few such requests would hold the admin
port's connections (128) and starve `/healthz`, `/readyz` and `/metrics`. A client that goes
away mid-body is no error of ours: a debug line, no traceback.

Strictly: UTF-8 only (`json.loads` of bytes would also take UTF-16 and UTF-32), no byte-order
mark, no name given twice (`{"grant": 1000000000, "grant": 1}` means nothing certain), and
deep nesting is a 400, not a RecursionError.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from gateway.admin.errors import error as _error

log = logging.getLogger("gateway.admin")


class _DuplicateName(ValueError):
    pass



def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)
    if len(document) != len(pairs):
        raise _DuplicateName
    return document


async def _receive(request: Request, limit: int) -> bytes | None:
    """The body; None once it is larger than `limit` bytes."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


async def read_json_object(request: Request, *, limit: int, timeout: float, expected: str) -> dict[str, Any] | Response:
    """The body as a JSON object, or the error answer: 408 `request_timeout`, 413
    `body_too_large`, 400 `bad_request` (`expected` says what to send)."""
    declared = request.headers.get("content-length", "")
    # (a length of thousands of digits is over any limit, and too long for int())
    if declared.isascii() and declared.isdigit() and (len(declared) > 18 or int(declared) > limit):
        return _error(413, "body_too_large", f"The body is at most {limit} bytes of JSON.", connection="close")
    try:
        async with asyncio.timeout(timeout):
            body = await _receive(request, limit)
    except TimeoutError:
        return _error(408, "request_timeout", "The request body did not arrive in time.", connection="close")
    except ClientDisconnect:
        log.debug("an admin client went away before sending its body: %s %.100s", request.method, request.url.path)
        return Response(status_code=499)  # nobody reads it: the connection is gone
    if body is None:
        return _error(413, "body_too_large", f"The body is at most {limit} bytes of JSON.", connection="close")
    try:
        document = json.loads(body.decode("utf-8"), object_pairs_hook=_object)
    except _DuplicateName:
        return _error(400, "bad_request", f"A name appears twice in the body: send {expected}.")
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return _error(400, "bad_request", f"The body is not JSON in UTF-8: send {expected}.")
    if not isinstance(document, dict):
        return _error(400, "bad_request", f"The body is a JSON object: {expected}.")
    return document
