"""Exceptions the client raises, one class per HTTP failure a caller reacts to differently.

The server answers errors as ``{"error": {"message", "type", "param", "code"}}``; the client keeps all of
it on the exception so a caller can show the server's own message and branch on the status (retry a 429
after ``retry_after``, re-upload on a 404, ...) without parsing strings.
"""

from __future__ import annotations

import json
from typing import Any

import httpx


class LoraplexError(Exception):
    """Base class: any failure talking to a loraplex (or OpenAI-compatible) server."""

    status: int | None = None

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        type: str | None = None,
        param: str | None = None,
        code: str | int | None = None,
        retry_after: float | None = None,
        body: Any = None,
    ) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status
        self.message, self.body, self.retry_after = message, body, retry_after
        # The server's {"error": {...}} fields, kept so a caller branches on them without parsing text.
        self.type, self.param, self.code = type, param, code

    def __str__(self) -> str:
        prefix = f"{self.status} " if self.status is not None else ""
        kind = f"{self.type}: " if self.type else ""
        return f"{prefix}{kind}{self.message}"


class APIConnectionError(LoraplexError):
    """The server could not be reached, or the connection broke mid-response."""


class APITimeoutError(APIConnectionError):
    """The request did not complete within the client's timeout."""


_BY_STATUS: dict[int, type[APIStatusError]] = {}


class APIStatusError(LoraplexError):
    """The server answered with a 4xx/5xx status.

    A subclass for one status names it in its class statement (``class X(APIStatusError, status=404)``),
    which sets ``status`` and registers the class for :func:`error_from_status`: the table of which
    status raises what is the list of declarations below, written once.
    """

    def __init_subclass__(cls, status: int | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if status is not None:
            cls.status = status
            _BY_STATUS[status] = cls


class BadRequestError(APIStatusError, status=400):
    """Invalid body, context too long, unknown composition, bad adapter upload."""


class AuthenticationError(APIStatusError, status=401):
    """Missing or invalid API key."""


class PermissionDeniedError(APIStatusError, status=403):
    """The key may not do this (adapter changes need the admin key)."""


class NotFoundError(APIStatusError, status=404):
    """Unknown model or adapter (also: one the key may not use)."""


class ConflictError(APIStatusError, status=409):
    """Uploading a name that exists."""


class PayloadTooLargeError(APIStatusError, status=413):
    """Body over the server's limit."""


class UnprocessableEntityError(APIStatusError, status=422):
    """A body the server could not validate."""


class RateLimitError(APIStatusError, status=429):
    """The server's queue is full; ``retry_after`` carries the Retry-After header in seconds."""


class InternalServerError(APIStatusError, status=500):
    """Server failure; also what an unknown 5xx status raises."""


class ServiceUnavailableError(InternalServerError, status=503):
    """Not ready yet (model loading) or draining for shutdown."""


class StreamError(LoraplexError):
    """The server reported an error inside an SSE stream after the 200 headers were sent."""


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # HTTP-date form; not worth a date parser here


def error_fields(body: Any) -> dict[str, Any]:
    """Pull ``message/type/param/code`` out of an OpenAI-style (or FastAPI ``detail``) error body."""
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            return {k: err.get(k) for k in ("message", "type", "param", "code")}
        if isinstance(err, str):
            return {"message": err}
        detail = body.get("detail")
        if detail is not None:
            return {"message": detail if isinstance(detail, str) else json.dumps(detail)}
    return {}


def error_from_status(status: int, body: Any, text: str = "", headers: Any = None) -> APIStatusError:
    """Build the exception for a failed response; unknown 4xx map to the base, 5xx to InternalServerError."""
    fields = error_fields(body)
    message = fields.get("message") or text.strip() or f"HTTP {status}"
    cls = _BY_STATUS.get(status)
    if cls is None:
        cls = InternalServerError if status >= 500 else APIStatusError
    retry_after = _parse_retry_after(headers.get("retry-after")) if headers is not None else None
    return cls(
        str(message),
        status=status,
        type=fields.get("type"),
        param=fields.get("param"),
        code=fields.get("code"),
        retry_after=retry_after,
        body=body,
    )


def error_from_response(response: httpx.Response) -> APIStatusError:
    """Exception for an already-read ``httpx.Response`` with a 4xx/5xx status."""
    try:
        body = response.json()
    except (ValueError, UnicodeDecodeError):
        body = None
    return error_from_status(response.status_code, body, response.text, response.headers)
