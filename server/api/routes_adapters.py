"""Adapter routes: our store API and vLLM's runtime load/unload.

Every mutation (upload, delete, merge, load, unload) needs an admin key; reads are filtered by the
caller's allow-list, and an adapter a key may not see answers 404 like a missing one.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
import uuid
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from server.api.auth import Principal, require_admin, require_key
from server.api.catalog import adapter_names, not_found, resident_names
from server.api.errors import APIError
from server.api.schemas import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from server.api.state import AppState, app_state
from server.api.uploads import (
    UPLOAD_OPENAPI,
    stage_validate_commit,
    upload_files,
    upload_name,
    validate_adapter_dir,
)
from server.engine.types import AdapterNotFoundError
from server.store import (
    AdapterMissingError,
    InvalidAdapterNameError,
    StoreError,
    check_adapter_name,
    tree_digest,
)

router = APIRouter(tags=["adapters"])


def _checked_name(name: str, param: str = "name") -> str:
    try:
        return check_adapter_name(name)
    except InvalidAdapterNameError as exc:
        raise APIError(400, str(exc), param=param) from None


def _store_error(exc: StoreError) -> APIError:
    return APIError(exc.status, str(exc))


def _lora_enabled(engine) -> None:
    if engine.adapters is None:
        raise APIError(400, "LoRA is disabled on this server (enable_lora=false)")


def _describe(state: AppState, engine, name: str) -> dict:
    """Store facts (config, rank, targets, size, digest) plus runtime facts (resident, requests)."""
    info: dict = {"id": name, "object": "adapter", "parent": engine.model_name}
    if state.store.exists(name):
        stored = state.store.describe(name)
        info.update(
            source="store",
            rank=stored.rank,
            target_modules=stored.target_modules,
            size_bytes=stored.size_bytes,
            digest=f"sha256:{stored.digest}",
            config=stored.config,
        )
    else:
        info.update(source="path")
    info["resident"] = name in resident_names(engine)
    info["requests"] = state.metrics.adapter_request_count(name)
    return info


# --- store API ------------------------------------------------------------------------------
@router.get("/v1/adapters")
async def list_adapters(
    state: AppState = Depends(app_state), principal: Principal = Depends(require_key)
) -> JSONResponse:
    engine = state.ready_engine()
    names = [n for n in adapter_names(engine, state.store) if principal.can_use(n)]
    data = await asyncio.to_thread(lambda: [_describe(state, engine, n) for n in names])
    return JSONResponse({"object": "list", "data": data})


@router.get("/v1/adapters/{name}")
async def get_adapter(
    name: str, state: AppState = Depends(app_state), principal: Principal = Depends(require_key)
) -> JSONResponse:
    engine = state.ready_engine()
    name = _checked_name(name)
    if not principal.can_use(name) or name not in adapter_names(engine, state.store):
        raise not_found(name, "name")
    return JSONResponse(await asyncio.to_thread(_describe, state, engine, name))


@router.post("/v1/adapters", status_code=201, openapi_extra=UPLOAD_OPENAPI)
async def upload_adapter(
    request: Request, state: AppState = Depends(app_state), _: Principal = Depends(require_admin)
) -> JSONResponse:
    """Multipart upload (``name``, ``adapter_config.json``, ``adapter_model.safetensors``)."""
    engine = state.ready_engine()
    _lora_enabled(engine)
    async with request.form(max_files=4, max_fields=8) as form:
        name = upload_name(form)
        files = upload_files(form, state.settings.max_adapter_bytes)
        if name in adapter_names(engine, state.store):
            raise APIError(409, f"adapter '{name}' already exists", param="name")

        def validate(staged: Path) -> None:
            validate_adapter_dir(engine, staged, name)

        try:
            stored = await asyncio.to_thread(stage_validate_commit, state.store, name, files, validate)
        except StoreError as exc:
            raise _store_error(exc) from None
    return JSONResponse(await asyncio.to_thread(_describe, state, engine, stored.name), status_code=201)


@router.delete("/v1/adapters/{name}")
async def delete_adapter(
    name: str, state: AppState = Depends(app_state), _: Principal = Depends(require_admin)
) -> JSONResponse:
    """Hides the adapter at once (new requests: 404), lets queued and running requests finish, deletes it.

    Weights already in host memory keep serving the requests admitted before the delete; once none
    uses the adapter (or the drain timeout passes) they are dropped too, so a later upload under
    the same name can never be served the old weights.
    """
    engine = state.ready_engine()
    name = _checked_name(name)
    try:
        trash = state.store.remove(name)
    except AdapterMissingError:
        raise not_found(name, "name") from None
    try:
        if engine.adapters is not None:
            await _wait_unused(engine, name, state.settings.drain_timeout_s)
            await asyncio.to_thread(engine.adapters.unload, name)
    finally:
        await asyncio.to_thread(state.store.purge, trash)
    return JSONResponse({"id": name, "object": "adapter", "deleted": True})


def _uses(key: str, name: str) -> bool:
    """Whether an adapter key (a name, or ``AdapterRef.key``'s ``compose(a:w,b:w)``) involves ``name``."""
    if key == name:
        return True
    if key.startswith("compose(") and key.endswith(")"):
        return any(part.rsplit(":", 1)[0] == name for part in key[len("compose(") : -1].split(","))
    return False


async def _wait_unused(engine, name: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = engine.stats()
        if not any(_uses(k, name) for k in (*stats.running_adapters, *stats.waiting_adapters)):
            return
        await asyncio.sleep(0.05)


@router.post("/v1/adapters/{name}/merge")
async def merge_adapter(
    name: str, state: AppState = Depends(app_state), _: Principal = Depends(require_admin)
) -> JSONResponse:
    """Exports base + adapter as a standalone HF checkpoint under ``settings.export_dir/<name>``."""
    engine = state.ready_engine()
    _lora_enabled(engine)
    name = _checked_name(name)
    if name not in adapter_names(engine, state.store):
        raise not_found(name, "name")
    export_root = Path(state.settings.export_dir)
    export_root.mkdir(parents=True, exist_ok=True)
    staged = export_root / f".merge-{uuid.uuid4().hex}"
    final = export_root / name
    try:
        await engine.merge_adapter(name, staged)
        digest = await asyncio.to_thread(tree_digest, staged)
        await asyncio.to_thread(_replace_dir, staged, final)
    finally:
        if staged.exists():
            await asyncio.to_thread(shutil.rmtree, staged, True)
    return JSONResponse({"id": name, "path": str(final.resolve()), "digest": f"sha256:{digest}"})


def _replace_dir(new: Path, final: Path) -> None:
    """Swaps ``new`` in as ``final``; an older export is moved aside first and then deleted."""
    old = final.parent / f".old-{uuid.uuid4().hex}"
    if final.exists():
        os.rename(final, old)
    os.rename(new, final)
    shutil.rmtree(old, ignore_errors=True)


# --- vLLM-compatible runtime loading ----------------------------------------------------------
def _allowed_path(state: AppState, raw: str) -> Path:
    """``raw`` resolved (symlinks included) and inside an allowed root; 400/404 otherwise."""
    roots = [Path(r).resolve() for r in state.settings.allowed_lora_roots]
    if not roots:
        raise APIError(
            400, "loading adapters by path is disabled (no allowed_lora_roots configured)", param="lora_path"
        )
    try:
        path = Path(raw).resolve(strict=True)
    except (OSError, RuntimeError, ValueError):
        raise APIError(404, f"lora_path '{raw}' does not exist", param="lora_path") from None
    if not any(path == root or path.is_relative_to(root) for root in roots):
        raise APIError(400, f"lora_path '{raw}' is outside the allowed roots", param="lora_path")
    if not path.is_dir():
        raise APIError(400, f"lora_path '{raw}' is not a directory", param="lora_path")
    return path


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(
    body: LoadLoRAAdapterRequest, state: AppState = Depends(app_state), _: Principal = Depends(require_admin)
) -> PlainTextResponse:
    engine = state.ready_engine()
    _lora_enabled(engine)
    name = _checked_name(body.lora_name, "lora_name")
    path = _allowed_path(state, body.lora_path)
    if not body.load_inplace and engine.adapters.exists(name):
        raise APIError(
            400,
            f"The lora adapter '{name}' has already been loaded. "
            "If you want to load the adapter in place, set 'load_inplace' to True.",
            param="lora_name",
        )
    try:  # validate first, so a bad path never replaces a registered adapter
        await asyncio.to_thread(validate_adapter_dir, engine, path, name)
        await engine.load_adapter(name, path, inplace=body.load_inplace)
    except ValueError as exc:  # AdapterError: fails validation against the base model
        raise APIError(400, str(exc), param="lora_path") from None
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(
    body: UnloadLoRAAdapterRequest,
    state: AppState = Depends(app_state),
    _: Principal = Depends(require_admin),
) -> PlainTextResponse:
    engine = state.ready_engine()
    _lora_enabled(engine)
    name = _checked_name(body.lora_name, "lora_name")
    try:
        await engine.unload_adapter(name)
    except AdapterNotFoundError:
        raise APIError(404, f"The lora adapter '{name}' cannot be found.", param="lora_name") from None
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")
