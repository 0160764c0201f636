"""Builds one server's runtime from ``Settings``: model, LoRA stack, engine, adapter service.

The only module that knows every part: the engine gets the LoRA side through its ``AdapterSlots``
protocol, the attention backend through ``AttentionBackend``, and neither imports the other. Tests
and benchmarks build through here too, so they run exactly what the server runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from server.config import Settings
from server.engine.async_engine import AsyncEngine, ServedModel
from server.engine.block_manager import BlockManager
from server.engine.llm_engine import EngineLimits, LLMEngine
from server.engine.model_runner import ModelRunner
from server.engine.sampler import Sampler
from server.engine.scheduler import Scheduler
from server.lora.setup import LoRAStack, build_lora
from server.model.attention import AttentionBackend, attention_backend_class
from server.model.geometry import ModelGeometry
from server.model.loader import eos_token_ids, load_model, load_tokenizer
from server.service.adapter_service import AdapterService
from server.store import AdapterStore
from server.structured.compiler import GrammarCompiler

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """Everything one server process runs; the HTTP app holds one."""

    settings: Settings
    engine: AsyncEngine
    adapters: AdapterService
    lora: LoRAStack | None
    device: torch.device
    dtype: torch.dtype
    grammars: GrammarCompiler  # structured outputs: compiles off the engine thread, cached

    def close(self) -> None:
        """Releases what outlives the engine thread (the adapter loader and grammar pools)."""
        if self.lora is not None:
            self.lora.close()
        self.grammars.close()


def build_attention(settings: Settings, geometry: ModelGeometry, device: str, dtype) -> AttentionBackend:
    """The attention backend with its KV cache: ``num_kv_blocks``, or as many as the memory budget holds."""
    backend = attention_backend_class(settings.attention_backend, device)
    per_block = backend.kv_bytes_per_block(geometry, settings.block_size, dtype)
    num_blocks = settings.num_kv_blocks or max(2, int(settings.kv_cache_memory_gb * 2**30 // per_block))
    return backend(geometry, num_blocks, settings.block_size, dtype, device)


def build_runtime(settings: Settings) -> Runtime:
    device, dtype = settings.resolved_device(), settings.resolved_dtype()
    torch.manual_seed(settings.seed)
    tokenizer = load_tokenizer(settings.model)
    model = load_model(settings.model, device, dtype)
    geometry = ModelGeometry.of(model.config)
    store = AdapterStore(settings.adapter_store)
    lora = build_lora(model, settings, store)
    slots = lora.manager if lora is not None else None
    attention = build_attention(settings, geometry, device, dtype)
    max_model_len = min(
        settings.max_model_len or geometry.max_position_embeddings, attention.num_blocks * settings.block_size
    )
    scheduler = Scheduler(
        BlockManager(attention.num_blocks, settings.block_size),
        settings.max_num_seqs,
        settings.max_num_batched_tokens,
        slots,
    )
    eos_ids = eos_token_ids(model, tokenizer)
    core = LLMEngine(
        ModelRunner(model, attention, slots),
        scheduler,
        Sampler(device, settings.seed, eos_ids),
        tokenizer,
        EngineLimits(max_model_len, eos_ids),
        slots,
    )
    name = settings.served_model_name or Path(settings.model).resolve().name
    engine = AsyncEngine(
        core, ServedModel(name, tokenizer, max_model_len, geometry.vocab_size), settings.max_queue_len
    )
    adapters = AdapterService(settings, store, lora, name, engine.stats)
    log.info("built %s on %s (%s), attention %s, %d KV blocks", name, device, dtype, attention.name,
             attention.num_blocks)  # fmt: skip
    grammars = GrammarCompiler(tokenizer, geometry.vocab_size, eos_ids)
    return Runtime(settings, engine, adapters, lora, torch.device(device), dtype, grammars)
