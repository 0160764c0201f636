"""Builds the LoRA side of a server from settings: merge, wrap the model, wire the residency tiers."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from server.config import Settings
from server.lora.adapter import load_peft_adapter
from server.lora.backend import make_lora_backend
from server.lora.catalog import AdapterCatalog
from server.lora.counters import LoRACounters
from server.lora.errors import AdapterError
from server.lora.host_cache import HostCache
from server.lora.layers import LoRAModel, inject_lora, lora_slot_dtype
from server.lora.manager import AdapterManager
from server.lora.merge import merge_adapter_into_model
from server.lora.reader import AdapterReader
from server.lora.slot_weights import blocks_for
from server.lora.spec import BaseModelSpec
from server.store import AdapterStore

log = logging.getLogger(__name__)


@dataclass
class LoRAStack:
    """Store names -> parsed host copies -> device slots, and the layers they feed."""

    model: LoRAModel
    catalog: AdapterCatalog
    reader: AdapterReader
    cache: HostCache
    manager: AdapterManager

    def close(self) -> None:
        self.manager.close()
        self.cache.close()


def build_lora(model: torch.nn.Module, settings: Settings, store: AdapterStore) -> LoRAStack | None:
    """The LoRA stack over ``model`` (None when LoRA is disabled).

    ``settings.merged_adapter`` is merged into the base weights first (a dedicated deployment at zero
    LoRA overhead); other adapters, if LoRA stays enabled, then apply on top of that merged base.
    """
    base_spec = BaseModelSpec.from_model(model)
    if settings.merged_adapter:
        merge_store_adapter(model, settings.merged_adapter, store, base_spec)
    if not settings.enable_lora:
        return None
    first = next(model.parameters())
    slot_dtype = lora_slot_dtype(first.dtype, settings.lora_dtype)
    # Slot memory for max_loras adapters of max_lora_rank, in pages of 16 ranks that adapters take as
    # their rank needs (S-LoRA's unified paging): as many slots as pages, so memory is the only bound.
    pages = settings.max_loras * blocks_for(settings.max_lora_rank)
    backend = make_lora_backend(settings.lora_backend, first.device, pages)
    lora = inject_lora(model, backend, settings.max_lora_rank, dtype=slot_dtype, num_pages=pages)
    catalog = AdapterCatalog(store)
    counters = LoRACounters()
    reader = AdapterReader(catalog, base_spec, lora, settings.max_lora_rank, counters)
    cache = HostCache(reader, settings.max_cpu_loras, settings.max_lora_rank, counters)
    log.info("LoRA: %d layers wrapped, slot memory for %d adapters of rank %d (%d pages of 16 ranks) in %s, "
             "backend %s", len(lora.layers), settings.max_loras, settings.max_lora_rank, pages,
             str(slot_dtype).removeprefix("torch."), backend.name)  # fmt: skip
    return LoRAStack(lora, catalog, reader, cache, AdapterManager(lora, cache))


def merge_store_adapter(model: torch.nn.Module, name: str, store: AdapterStore, base_spec) -> None:
    """Merges the store adapter ``name`` into ``model`` in place."""
    if not store.exists(name):
        raise AdapterError(f"merged_adapter '{name}' is not in the adapter store {store.root}")
    adapter = load_peft_adapter(store.path_of(name), name, base_spec, max_rank=1 << 30, root=store.root)
    merge_adapter_into_model(model, adapter)
    log.info("merged adapter '%s' into the base weights", name)
