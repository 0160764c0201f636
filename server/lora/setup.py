"""The seam between the engine and the LoRA package: wrap the model, build the manager."""

from __future__ import annotations

import torch

from server.config import Settings


def build_lora(model: torch.nn.Module, settings: Settings, device: str, dtype: torch.dtype):
    """Returns ``(manager, base_spec, lora_batch_hook)``, or Nones when LoRA is disabled.

    The base spec is captured before wrapping so validation sees the plain model's linears.
    """
    if not settings.enable_lora:
        return None, None, None
    from server.lora.adapter import BaseModelSpec
    from server.lora.layers import inject_lora
    from server.lora.manager import AdapterManager

    base_spec = BaseModelSpec.from_model(model)
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
    return manager, base_spec, manager.set_batch
