"""The FastAPI app factory and its lifespan.

The engine is built and warmed in a background task, not inside lifespan startup, so ``/health``
answers (and ``/ready`` says 503) while a large model loads - what Kubernetes probes expect. On
shutdown the engine stops admitting, running requests finish (up to the drain timeout), then its
thread stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.auth import Authenticator
from server.api.errors import install_error_handlers
from server.api.limits import BodySizeLimitMiddleware
from server.api.routes_adapters import router as adapters_router
from server.api.routes_openai import router as openai_router
from server.api.routes_ops import router as ops_router
from server.api.routes_tokenize import router as tokenize_router
from server.api.state import AppState
from server.config import Settings
from server.metrics import ServerMetrics

if TYPE_CHECKING:
    from server.bootstrap import Runtime

log = logging.getLogger(__name__)

UPLOAD_PATH = "/v1/adapters"
_MULTIPART_OVERHEAD = 1 << 20  # boundaries, headers and the name field around the two files


class RequestMetricsMiddleware:
    """Counts every request by route template and status, and times it to its last byte."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(route=label, status=str(status)).inc()
            self.metrics.request_seconds.labels(route=label).observe(time.monotonic() - start)


async def _boot(state: AppState, runtime: Runtime | None) -> None:
    """Builds (unless given) and starts the runtime; failures are kept for /health and /ready."""
    try:
        if runtime is None:
            from server.bootstrap import build_runtime

            runtime = await asyncio.to_thread(build_runtime, state.settings)
        state.runtime = runtime
        if state.draining:
            return  # SIGTERM came while the model loaded: nothing left to start
        if not runtime.engine.ready:
            await runtime.engine.start()
        log.info("engine ready: serving %s", runtime.engine.served.name)
    except Exception as exc:
        state.boot_error = f"{type(exc).__name__}: {exc}"
        log.exception("engine failed to start")


def create_app(settings: Settings, runtime: Runtime | None = None) -> FastAPI:
    """The server app; ``runtime`` (built by ``build_runtime``, engine started or not) is for tests."""
    state = AppState(
        settings=settings,
        auth=Authenticator(settings),
        metrics=ServerMetrics(
            lambda: state.runtime if state.runtime and state.runtime.engine.ready else None
        ),
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        boot = asyncio.create_task(_boot(state, runtime))
        try:
            yield
        finally:
            if not boot.done():
                await boot  # an engine half-built in a thread cannot be interrupted; let it finish
            if state.runtime is not None:
                await state.runtime.engine.shutdown(settings.drain_timeout_s)
                await asyncio.to_thread(state.runtime.close)
            state.tokenizer_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="loraplex",
        version="0.1.0",
        summary="Multi-LoRA inference server with an OpenAI-compatible API.",
        lifespan=lifespan,
    )
    app.state.loraplex = state
    install_error_handlers(app)
    app.include_router(openai_router)
    app.include_router(adapters_router)
    app.include_router(ops_router)
    app.include_router(tokenize_router)
    app.add_middleware(
        BodySizeLimitMiddleware,
        default_limit=settings.max_body_bytes,
        upload_path=UPLOAD_PATH,
        upload_limit=settings.max_adapter_bytes + _MULTIPART_OVERHEAD,
    )
    app.add_middleware(RequestMetricsMiddleware, metrics=state.metrics)
    return app
