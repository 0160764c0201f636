"""Adapter routes: our store API and vLLM's runtime load/unload, as thin HTTP over the adapter service.

Every mutation (upload, delete, merge, load, unload) needs an admin key; reads are filtered by the
caller's allow-list, and an adapter a key may not see answers 404 like a missing one.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from server.api.auth import Principal, require_admin, require_key
from server.api.schemas import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from server.api.state import AppState, app_state
from server.api.uploads import UPLOAD_OPENAPI, upload_files, upload_name
from server.service.resolve import not_found
from server.service.results import AdapterInfo

if TYPE_CHECKING:
    from server.bootstrap import Runtime

router = APIRouter(tags=["adapters"])


def _render(info: AdapterInfo, rt: Runtime, state: AppState) -> dict:
    body: dict = {
        "id": info.name,
        "object": "adapter",
        "parent": rt.engine.served.name,
        "source": info.source,
    }
    if info.source == "store":
        body.update(rank=info.rank, target_modules=info.target_modules, size_bytes=info.size_bytes,
                    digest=info.digest, config=info.config)  # fmt: skip
    body["resident"] = info.resident
    body["requests"] = state.metrics.adapter_request_count(info.name)
    return body


# --- store API ------------------------------------------------------------------------------
@router.get("/v1/adapters")
async def list_adapters(
    state: AppState = Depends(app_state), principal: Principal = Depends(require_key)
) -> JSONResponse:
    rt = state.ready_runtime()
    names = [n for n in rt.adapters.names() if principal.can_use(n)]
    infos = await asyncio.to_thread(lambda: [rt.adapters.describe(n) for n in names])
    return JSONResponse({"object": "list", "data": [_render(i, rt, state) for i in infos]})


@router.get("/v1/adapters/{name}")
async def get_adapter(
    name: str, state: AppState = Depends(app_state), principal: Principal = Depends(require_key)
) -> JSONResponse:
    rt = state.ready_runtime()
    if not principal.can_use(name):
        raise not_found(name, "name")
    return JSONResponse(_render(await asyncio.to_thread(rt.adapters.describe, name), rt, state))


@router.post("/v1/adapters", status_code=201, openapi_extra=UPLOAD_OPENAPI)
async def upload_adapter(
    request: Request, state: AppState = Depends(app_state), _: Principal = Depends(require_admin)
) -> JSONResponse:
    """Multipart upload (``name``, ``adapter_config.json``, ``adapter_model.safetensors``)."""
    rt = state.ready_runtime()
    async with request.form(max_files=4, max_fields=8) as form:
        name = upload_name(form)
        files = upload_files(form, state.settings.max_adapter_bytes)
        info = await rt.adapters.upload(name, {role: upload.file for role, upload in files.items()})
    return JSONResponse(_render(info, rt, state), status_code=201)


@router.delete("/v1/adapters/{name}")
async def delete_adapter(
    name: str, state: AppState = Depends(app_state), _: Principal = Depends(require_admin)
) -> JSONResponse:
    """Hides the adapter at once (new requests: 404), lets queued and running requests finish, deletes it."""
    await state.ready_runtime().adapters.delete(name)
    state.metrics.forget_adapter(name)
    return JSONResponse({"id": name, "object": "adapter", "deleted": True})


@router.post("/v1/adapters/{name}/merge")
async def merge_adapter(
    name: str, state: AppState = Depends(app_state), _: Principal = Depends(require_admin)
) -> JSONResponse:
    """Exports base + adapter as a standalone HF checkpoint under ``settings.export_dir/<name>``."""
    result = await state.ready_runtime().adapters.merge(name)
    return JSONResponse({"id": result.name, "path": str(result.path), "digest": result.digest})


# --- vLLM-compatible runtime loading ----------------------------------------------------------
@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(
    body: LoadLoRAAdapterRequest, state: AppState = Depends(app_state), _: Principal = Depends(require_admin)
) -> PlainTextResponse:
    await state.ready_runtime().adapters.load(body.lora_name, body.lora_path, inplace=body.load_inplace)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(
    body: UnloadLoRAAdapterRequest,
    state: AppState = Depends(app_state),
    _: Principal = Depends(require_admin),
) -> PlainTextResponse:
    await state.ready_runtime().adapters.unload(body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
