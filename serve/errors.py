"""Errors in OpenAI's shape, `{"error": {message, type, param, code}}`, for every route and every failure:
bad JSON, a field out of range (naming it, as a path: messages[2].role), a body over the size limit, an
unknown route, a server error.

Raise `ApiError` anywhere in the ingress; `install(app)` turns it, FastAPI's validation errors and
Starlette's HTTP errors into that shape, refuses bodies over `app.state.max_body_bytes`, and takes a client
that hangs up for a disconnect.
"""

import re

from fastapi import FastAPI, Request
from ray.exceptions import TaskCancelledError
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from serve.schemas import ErrorBody, ErrorResponse


class ApiError(HTTPException):
    """An error to answer with: the HTTP status and OpenAI's error body. An HTTPException, so that FastAPI
    passes it on where it would turn other errors into a 400 (raised while it reads the body)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(status, message)
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


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"body: larger than this server's limit of {limit} bytes", code="request_too_large")


class BodyLimit:
    """Refuses a request body over the app's `state.max_body_bytes` with a 413 before anything reads it into
    memory: at once where Content-Length announces it, else as soon as the chunks read add up to more.
    (FastAPI's own max_body_size answers the first case in plain text, not in OpenAI's shape.)"""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = scope["app"].state.max_body_bytes
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > limit:
            return await error_response(413, too_large(limit).body)(scope, receive, send)
        read = 0

        async def limited_receive():
            nonlocal read
            message = await receive()
            read += len(message.get("body", b""))
            if read > limit:
                raise too_large(limit)
            return message

        await self.app(scope, limited_receive, send)


class HangUp:
    """A client that hangs up mid-response is a disconnect, not an error. Serve's proxy then cancels the call
    that feeds the replica the request's ASGI messages, and `receive` raises TaskCancelledError where Starlette
    waits for the disconnect; left alone it ends the request's task with an exception nobody retrieves, which
    asyncio logs ("Future exception was never retrieved") for every dropped stream."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def receive_or_disconnect():
            try:
                return await receive()
            except TaskCancelledError:
                return {"type": "http.disconnect"}

        await self.app(scope, receive_or_disconnect if scope["type"] == "http" else receive, send)


def install(app: FastAPI, max_body_bytes: int) -> None:
    """Answer every error of `app` in OpenAI's shape, and refuse bodies over max_body_bytes (the Serve ingress
    may set app.state.max_body_bytes again before the first request)."""
    app.state.max_body_bytes = max_body_bytes
    app.add_middleware(BodyLimit)
    app.add_middleware(HangUp)  # added last, so outermost: the body limit reads through it
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _server_error)
