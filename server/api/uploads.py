"""Adapter upload, the HTTP half: the multipart form -> the adapter's name and its two files.

The adapter service does the rest (stage, validate as serving will, publish atomically), so any
failure - bad shapes, a pickle file, a traversal name, truncated safetensors, an oversize file -
leaves the store byte-for-byte as it was.
"""

from __future__ import annotations

from pathlib import Path

from starlette.datastructures import FormData, UploadFile

from server.api.errors import APIError
from server.store import CONFIG_FILE, WEIGHTS_FILE

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


def upload_name(form: FormData) -> str:
    """The ``name`` field (validated by the adapter service)."""
    name = form.get("name")
    if not isinstance(name, str):
        raise APIError(400, "multipart field 'name' is required", param="name")
    return name


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
