"""Errors in OpenAI's shape, `{"error": {message, type, param, code}}`, for every route and every failure:
bad JSON, a field out of range (naming it, as a path: messages[2].role), an unknown route, a server error.

Raise `ApiError` anywhere in the ingress; `install(app)` turns it, FastAPI's validation errors and
Starlette's HTTP errors into that shape.
"""

import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from serve.schemas import ErrorBody, ErrorResponse


class ApiError(Exception):
    """An error to answer with: the HTTP status and OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.body = status, ErrorBody(message=message, type=type, param=param, code=code)


def invalid(param: str, message: str, code: str = "invalid_value") -> ApiError:
    """A 400 for one field, its message starting with the field's name."""
    return ApiError(400, message if message.startswith(param) else f"{param}: {message}", param, code)


def error_response(status: int, body: ErrorBody) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=body).model_dump(), status_code=status)


def server_error(e: BaseException) -> ErrorResponse:
    return ErrorResponse(error=ErrorBody(message=f"{type(e).__name__}: {e}", type="server_error"))


def _param(loc: tuple) -> str | None:
    """A validation error's location as a field path: ("body", "messages", 2, "role") -> messages[2].role."""
    path = ""
    for part in loc[1:]:
        if isinstance(part, int):
            path += f"[{part}]"
        elif re.fullmatch(r"[a-z_]+", part) and part not in ("str", "int", "list", "float", "bool"):
            path += f".{part}" if path else part
    return path or None


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    err = exc.errors()[0]
    if err["type"] == "json_invalid":
        return error_response(400, ErrorBody(message=f"body is not valid JSON: {err['msg']}", code="invalid_json"))
    param = _param(tuple(err["loc"]))
    code = ("missing_required_parameter" if err["type"] == "missing" else
            "invalid_type" if err["type"].endswith("_type") else "invalid_value")
    message = err["msg"].removeprefix("Value error, ")
    return error_response(400, ErrorBody(message=f"{param or 'body'}: {message}", param=param, code=code))


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.body)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return error_response(exc.status_code, ErrorBody(message=f"{request.method} {request.url.path}: {exc.detail}",
                                                     code="not_found" if exc.status_code == 404 else None))


async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    return error_response(500, server_error(exc).error)


def install(app: FastAPI) -> None:
    """Answer every error of `app` in OpenAI's shape."""
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _server_error)
