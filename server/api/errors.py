"""OpenAI-shaped errors for every 4xx/5xx the server returns.

Clients written for OpenAI (and vLLM) parse ``{"error": {"message", "type", "param", "code"}}``;
FastAPI's own shapes (``{"detail": ...}``, 422 for validation) would break them, so every path that
can produce an error response - our routes, the engine, request validation, unknown routes,
unhandled exceptions - becomes an :class:`APIError` and is rendered by its ``response()``.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.engine.types import (
    EngineError,
    EngineStoppedError,
    ErrorKind,
    InvalidRequestError,
    QueueFullError,
)
from server.service.errors import (
    AdapterConflictError,
    AdapterNotFoundError,
    AdapterServiceError,
    InvalidAdapterError,
    LoRADisabledError,
    PathNotAllowedError,
)

log = logging.getLogger(__name__)

# Default OpenAI-style ``type`` per status, used when the raiser does not name one.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "request_too_large",
    415: "invalid_request_error",
    429: "rate_limit_exceeded",
    503: "service_unavailable",
}


def error_type_for(status: int) -> str:
    return _TYPES.get(status, "invalid_request_error" if status < 500 else "internal_error")


class APIError(Exception):
    """Raised by routes and helpers; rendered by the app's handler in OpenAI's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or error_type_for(status)
        self.param = param
        self.headers = headers

    def body(self) -> dict:
        """The error object; ``code`` carries the HTTP status, as vLLM's server does."""
        return {
            "error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# The one place where what went wrong (an exception class, an error kind) becomes an HTTP status.
_STATUS_OF_EXCEPTION: dict[type[Exception], int] = {
    InvalidRequestError: 400,
    QueueFullError: 429,
    EngineStoppedError: 503,
    AdapterNotFoundError: 404,
    AdapterConflictError: 409,
    InvalidAdapterError: 400,
    LoRADisabledError: 400,
    PathNotAllowedError: 400,
}
STATUS_OF_ERROR_KIND = {
    ErrorKind.ADAPTER_UNAVAILABLE: 400,
    ErrorKind.INTERNAL: 500,
    ErrorKind.OUT_OF_MEMORY: 503,
    ErrorKind.SHUTTING_DOWN: 503,
}


def api_error_from(exc: EngineError | AdapterServiceError) -> APIError:
    """The HTTP rendering of an engine or adapter-service error (500 for any class not listed)."""
    status = next((s for cls, s in _STATUS_OF_EXCEPTION.items() if isinstance(exc, cls)), 500)
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    return APIError(status, str(exc), param=getattr(exc, "param", None), headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """First problem as ``field: message`` (plus a count of the rest), and the field as ``param``."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path", "header")]
    param = ".".join(loc) or None
    message = f"{param}: {first.get('msg', 'invalid value')}" if param else str(first.get("msg", "invalid"))
    named = (first.get("ctx") or {}).get("param")  # schemas.refused(): the message names it already
    if named:
        param, message = named, str(first.get("msg"))
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return message, param


def install_error_handlers(app: FastAPI) -> None:
    """Routes every error FastAPI/Starlette can raise through the OpenAI shape."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(EngineError)
    @app.exception_handler(AdapterServiceError)
    async def _domain_error(_: Request, exc: EngineError | AdapterServiceError) -> JSONResponse:
        return api_error_from(exc).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return APIError(400, message, type="invalid_request_error", param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        if status == 404 and exc.detail == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        elif isinstance(exc.detail, str):
            message = exc.detail
        else:
            message = HTTPStatus(status).phrase
        return APIError(status, message, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return APIError(500, "internal server error", type="internal_error").response()
