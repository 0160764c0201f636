"""The seam between the engine and the LoRA package: merge, wrap the model, build the manager."""

from __future__ import annotations

import logging

import torch

from server.config import Settings

log = logging.getLogger(__name__)


def build_lora(model: torch.nn.Module, settings: Settings, device: str, dtype: torch.dtype):
    """Returns ``(manager, base_spec, lora_batch_hook)``; the manager and hook are None without LoRA.

    ``settings.merged_adapter`` is merged into the base weights first (a dedicated deployment at zero
    LoRA overhead); other adapters, if LoRA stays enabled, then apply on top of that merged base.
    """
    from server.lora.spec import BaseModelSpec

    base_spec = BaseModelSpec.from_model(model)
    if settings.merged_adapter:
        merge_store_adapter(model, settings, base_spec)
    if not settings.enable_lora:
        return None, base_spec, None
    from server.lora.layers import inject_lora
    from server.lora.manager import AdapterManager

    handle = inject_lora(model, settings.max_loras, settings.max_lora_rank, backend=settings.lora_backend)
    manager = AdapterManager(
        handle,
        settings.adapter_store,
        base_spec,
        max_loras=settings.max_loras,
        max_cpu_loras=settings.max_cpu_loras,
        max_rank=settings.max_lora_rank,
        device=device,
        dtype=dtype,
    )
    log.info("LoRA: %d layers wrapped, %d slots of rank %d, backend %s", len(handle.layers),
             settings.max_loras, settings.max_lora_rank, handle.backend)  # fmt: skip
    return manager, base_spec, manager.set_batch


def merge_store_adapter(model: torch.nn.Module, settings: Settings, base_spec) -> None:
    """Merges the store adapter ``settings.merged_adapter`` into ``model`` in place."""
    from server.lora.adapter import load_peft_adapter
    from server.lora.errors import AdapterError
    from server.lora.merge import merge_adapter_into_model

    name = settings.merged_adapter
    path = settings.adapter_store / name
    if not path.is_dir():
        raise AdapterError(f"merged_adapter '{name}' is not in the adapter store {settings.adapter_store}")
    merge_adapter_into_model(model, load_peft_adapter(path, name, base_spec, max_rank=1 << 30))
    log.info("merged adapter '%s' into the base weights", name)
