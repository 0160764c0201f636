"""Input checks of the adapter service: names, and paths a caller asks the server to read."""

from __future__ import annotations

from pathlib import Path

from server.service.errors import AdapterNotFoundError, InvalidAdapterError, PathNotAllowedError
from server.store import InvalidAdapterNameError, check_adapter_name


def check_name(name: str, param: str) -> str:
    try:
        return check_adapter_name(name)
    except InvalidAdapterNameError as exc:
        raise InvalidAdapterError(str(exc), param) from None


def allowed_adapter_path(raw: str, allowed_roots: list[Path]) -> tuple[Path, Path]:
    """``raw`` with symlinks resolved, if it is a directory inside one of ``allowed_roots``; and that root
    (resolved too), which every file of the adapter must still resolve into when it is opened."""
    roots = [Path(r).resolve() for r in allowed_roots]
    if not roots:
        raise PathNotAllowedError(
            "loading adapters by path is disabled (no allowed_lora_roots configured)", "lora_path"
        )
    try:
        path = Path(raw).resolve(strict=True)
    except (OSError, RuntimeError, ValueError):
        raise AdapterNotFoundError(f"lora_path '{raw}' does not exist", "lora_path") from None
    root = next((root for root in roots if path == root or path.is_relative_to(root)), None)
    if root is None:
        raise PathNotAllowedError(f"lora_path '{raw}' is outside the allowed roots", "lora_path")
    if not path.is_dir():
        raise InvalidAdapterError(f"lora_path '{raw}' is not a directory", "lora_path")
    return path, root
