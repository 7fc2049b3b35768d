"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` for every failure.

Exception text can quote a request (PHI), so a failure nobody planned for is logged by its class
name only and answered with a plain 500: `ContainErrors` is the last stop for any exception that
escapes a handler or a stream, so none reaches the ASGI server, which would print its traceback.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clinicloop.backends.base import EngineError
from clinicloop.serving.protocol import ErrorInfo, ErrorResponse

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    502: "upstream_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, *, code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param
        self.headers = headers

    @classmethod
    def from_engine(cls, exc: EngineError) -> OpenAIError:
        return cls(exc.status, str(exc), code=exc.code, param=exc.param)

    def body(self) -> ErrorResponse:
        return error_body(self.status, str(self), code=self.code, param=self.param)

    def response(self) -> JSONResponse:
        return error_response(self.status, str(self), code=self.code, param=self.param,
                              headers=self.headers)


def error_body(status: int, message: str, *, code: str | None = None,
               param: str | None = None) -> ErrorResponse:
    kind = _TYPES.get(status, "internal_error" if status >= 500 else "invalid_request_error")
    return ErrorResponse(error=ErrorInfo(message=message, type=kind, param=param, code=code))


def error_response(status: int, message: str, *, code: str | None = None,
                   param: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = error_body(status, message, code=code, param=param)
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def as_openai_error(exc: Exception) -> OpenAIError:
    """The error a client is told about `exc`; one nobody planned for is logged (class name only)
    and becomes a plain 500."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, EngineError):
        return OpenAIError.from_engine(exc)
    log.error("unhandled %s while serving a request", type(exc).__name__)
    return OpenAIError(500, "internal server error", code="internal_error")


class ContainErrors:
    """The outermost middleware: an exception escaping the app is logged by class name only and,
    if no response has begun, answered with a 500; a response already under way is cut off (the
    client sees an incomplete body, never a complete-looking one). Nothing is re-raised."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            error = as_openai_error(exc)
            if not started:
                await error.response()(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    async def _known(_: Request, exc: Exception) -> JSONResponse:
        return as_openai_error(exc).response()

    app.add_exception_handler(OpenAIError, _known)
    app.add_exception_handler(EngineError, _known)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
        message = first.get("msg", "invalid request").removeprefix("Value error, ")
        where = ".".join(loc)
        return error_response(400, f"{where}: {message}" if where else message,
                              param=where or None, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), headers=exc.headers)
