"""Request body size limits, enforced before any route parses the body.

A pure ASGI middleware: it rejects a declared ``Content-Length`` over the limit at once, and counts
streamed bytes for chunked bodies, so an oversized body never reaches the JSON or multipart parser
(and never fills memory or the temp dir). Adapter uploads get their own, larger limit.
"""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import APIError


class _BodyTooLarge(StarletteHTTPException):
    """An HTTPException so FastAPI's body parsing re-raises it (as 413) instead of turning it into 400."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than the limit of {limit} bytes")
        self.limit = limit


async def _send_413(send: Send, limit: int) -> None:
    body = json.dumps(
        APIError(
            413, f"request body is larger than the limit of {limit} bytes", type="request_too_large"
        ).body()
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BodySizeLimitMiddleware:
    """413 for bodies over ``default_limit``, or over ``upload_limit`` on ``upload_path`` POSTs."""

    def __init__(self, app: ASGIApp, default_limit: int, upload_path: str, upload_limit: int) -> None:
        self.app = app
        self.default_limit = default_limit
        self.upload_path = upload_path
        self.upload_limit = upload_limit

    def limit_for(self, scope: Scope) -> int:
        if scope.get("method") == "POST" and scope.get("path", "").rstrip("/") == self.upload_path:
            return self.upload_limit
        return self.default_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope)
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > limit:
                    await _send_413(send, limit)
                    return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await _send_413(send, limit)
