"""Operations endpoints: liveness, readiness, Prometheus metrics (no auth, for probes and scrapers)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from server.api.errors import APIError
from server.api.state import AppState, app_state
from server.metrics import CONTENT_TYPE

router = APIRouter(tags=["ops"])


@router.get("/health")
async def health(state: AppState = Depends(app_state)) -> Response:
    """Live unless the engine failed to start (then a restart is the fix)."""
    if state.boot_error is not None:
        return APIError(503, f"engine failed to start: {state.boot_error}").response()
    return JSONResponse({"status": "ok"})


@router.get("/ready")
async def ready(state: AppState = Depends(app_state)) -> Response:
    """200 once the model is loaded and warm, 503 before (and while shutting down)."""
    runtime = state.runtime
    if runtime is None or not runtime.engine.ready:
        return APIError(503, "engine is not ready", headers={"Retry-After": "1"}).response()
    return JSONResponse({"status": "ready", "model": runtime.engine.served.name})


@router.get("/metrics")
async def metrics(state: AppState = Depends(app_state)) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)
