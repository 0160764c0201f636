"""Adapter upload: multipart form -> staged files -> full validation -> atomic publish.

Nothing becomes visible before the adapter has been parsed and checked against the base model by
the same loader that serves it (``load_peft_adapter``): the files are written into a hidden
staging directory inside the store, validated there, and only then renamed onto their name. Any
failure - bad shapes, a pickle file, a traversal name, truncated safetensors, an oversize file -
removes the staging directory, leaving the store byte-for-byte as it was.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from starlette.datastructures import FormData, UploadFile

from server.api.errors import APIError
from server.store import AdapterStore, InvalidAdapterNameError, StoredAdapter, check_adapter_name

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# A file part is identified by its form field name, or failing that by its filename.
_ROLES = {
    "adapter_config.json": CONFIG_FILE,
    "adapter_config": CONFIG_FILE,
    "adapter_model.safetensors": WEIGHTS_FILE,
    "adapter_model": WEIGHTS_FILE,
}

UPLOAD_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["name", CONFIG_FILE, WEIGHTS_FILE],
                    "properties": {
                        "name": {"type": "string", "description": "Adapter name."},
                        CONFIG_FILE: {"type": "string", "format": "binary"},
                        WEIGHTS_FILE: {"type": "string", "format": "binary"},
                    },
                }
            }
        },
    }
}


def validate_adapter_dir(engine, path: Path, name: str) -> None:
    """Parses the adapter in ``path`` exactly as serving will, and checks it fits this server's slots.

    Raises ``AdapterError`` (a ``ValueError``) naming what is wrong.
    """
    from server.lora.adapter import load_peft_adapter

    adapter = load_peft_adapter(path, name, engine.base_spec, engine.settings.max_lora_rank)
    engine.adapters.lora.check(adapter)


def upload_name(form: FormData) -> str:
    name = form.get("name")
    if not isinstance(name, str):
        raise APIError(400, "multipart field 'name' is required", param="name")
    try:
        return check_adapter_name(name)
    except InvalidAdapterNameError as exc:
        raise APIError(400, str(exc), param="name") from None


def upload_files(form: FormData, max_bytes: int) -> dict[str, UploadFile]:
    """The two expected files by target name; 400 for anything else, 413 over ``max_bytes``."""
    files: dict[str, UploadFile] = {}
    for field_name, value in form.multi_items():
        if not isinstance(value, UploadFile):
            if field_name != "name":
                raise APIError(400, f"unexpected form field '{field_name}'", param=field_name)
            continue
        role = _ROLES.get(field_name) or _ROLES.get(Path(value.filename or "").name)
        if role is None:
            shown = value.filename or field_name
            hint = (
                " (pickle weights are refused; upload adapter_model.safetensors)"
                if shown.endswith((".bin", ".pt", ".pth", ".pkl"))
                else ""
            )
            raise APIError(
                400,
                f"unexpected file '{shown}'{hint}; send {CONFIG_FILE} and {WEIGHTS_FILE}",
                param=field_name,
            )
        if role in files:
            raise APIError(400, f"{role} was sent twice", param=field_name)
        files[role] = value
    missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE) if f not in files]
    if missing:
        raise APIError(400, f"missing file(s): {', '.join(missing)}", param=missing[0])
    total = sum(_size(f) for f in files.values())
    if total > max_bytes:
        raise APIError(413, f"adapter files total {total} bytes, over the limit of {max_bytes} bytes")
    return files


def _size(upload: UploadFile) -> int:
    if upload.size is not None:
        return upload.size
    upload.file.seek(0, 2)
    size = upload.file.tell()
    upload.file.seek(0)
    return size


def stage_validate_commit(
    store: AdapterStore, name: str, files: dict[str, UploadFile], validate
) -> StoredAdapter:
    """Blocking (run it in a thread): write into staging, ``validate(staged_dir)``, publish atomically.

    ``validate`` raises ``ValueError`` (e.g. ``AdapterError``) for a bad adapter -> 400; the store's
    ``AdapterExistsError`` (-> 409) is left to the caller.
    """
    with store.staging() as staged:
        for target, upload in files.items():
            upload.file.seek(0)
            with open(staged / target, "wb") as out:
                shutil.copyfileobj(upload.file, out, 1 << 20)
        try:
            validate(staged)
        except ValueError as exc:
            raise APIError(400, str(exc).replace(str(staged), "<upload>")) from None
        return store.commit(staged, name)
