"""Typed failures of the adapter service. Each says what went wrong and, where a caller's input was
at fault, which input (``param``); the HTTP layer alone decides what status each one becomes."""

from __future__ import annotations


class AdapterServiceError(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class AdapterNotFoundError(AdapterServiceError):
    """No such adapter (or one the caller may not see)."""


class AdapterConflictError(AdapterServiceError):
    """The name is taken: an adapter exists, or a concurrent upload won."""


class InvalidAdapterError(AdapterServiceError):
    """The input is wrong: a bad name, files that fail validation, an already-loaded name (vLLM)."""


class LoRADisabledError(AdapterServiceError):
    """The server runs without LoRA layers (``enable_lora=false``)."""


class PathNotAllowedError(AdapterServiceError):
    """``lora_path`` is outside ``allowed_lora_roots`` (or loading by path is off)."""
