"""The admin API's error answer: the same JSON body as every other gateway error."""

from __future__ import annotations

from starlette.responses import JSONResponse


def error(status: int, error: str, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"success": False, "error": error, "message": message}, status_code=status, headers=headers)
