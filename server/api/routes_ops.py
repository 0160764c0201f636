"""Operations endpoints: liveness, readiness, Prometheus metrics.

No auth on the probes; ``/metrics`` is open too unless ``metrics_require_key`` is set (the Gateway API
Inference Extension scrapes it), and its labels carry adapter names.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from server.api.auth import require_key
from server.api.errors import APIError
from server.api.state import AppState, app_state
from server.metrics import CONTENT_TYPE

router = APIRouter(tags=["ops"])


def _hung_step(state: AppState) -> str | None:
    runtime = state.runtime
    hung = runtime.engine.watchdog.hung_for() if runtime is not None else None
    if hung is None:
        return None
    limit = state.settings.engine_step_timeout_s
    return f"engine step has been running for {hung:.1f} s (engine_step_timeout_s={limit:g})"


@router.get("/health")
async def health(state: AppState = Depends(app_state)) -> Response:
    """Live unless the engine failed to start or a step hangs past ``engine_step_timeout_s`` (then a
    restart is the fix). Draining is still live: the pod is finishing its requests."""
    if state.boot_error is not None:
        return APIError(503, f"engine failed to start: {state.boot_error}").response()
    if (hung := _hung_step(state)) is not None:
        return APIError(503, hung).response()
    return JSONResponse({"status": "ok"})


@router.get("/ready")
async def ready(state: AppState = Depends(app_state)) -> Response:
    """200 once the model is loaded and warm; 503 before, from the moment a drain starts, and while a
    step hangs."""
    runtime = state.runtime
    if state.draining:
        return APIError(503, "the server is shutting down", headers={"Retry-After": "1"}).response()
    if runtime is None or not runtime.engine.ready:
        return APIError(503, "engine is not ready", headers={"Retry-After": "1"}).response()
    if (hung := _hung_step(state)) is not None:
        return APIError(503, hung, headers={"Retry-After": "1"}).response()
    return JSONResponse({"status": "ready", "model": runtime.engine.served.name})


@router.get("/metrics")
async def metrics(request: Request, state: AppState = Depends(app_state)) -> Response:
    """Open (scrapers, the inference gateway) unless ``metrics_require_key``: then any API key."""
    if state.settings.metrics_require_key:
        require_key(request)
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)
