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
from server.engine.admission import AdmissionOrder
from server.engine.async_engine import AsyncEngine, ServedModel
from server.engine.block_manager import BlockManager
from server.engine.decode_graphs import (
    CompiledDecode,
    CudaGraphCapture,
    DecodeGraphs,
    EagerReplay,
    bucket_sizes,
)
from server.engine.llm_engine import EngineLimits, LLMEngine
from server.engine.memory_budget import MemoryBudget, dummy_step, profile_activation_peak, sampler_bytes
from server.engine.model_runner import ModelRunner
from server.engine.sampler import Sampler
from server.engine.scheduler import Scheduler
from server.lora.setup import LoRAStack, build_lora
from server.model.attention import AttentionBackend, attention_backend_class
from server.model.geometry import ModelGeometry
from server.model.loader import check_serving_model, eos_token_ids, load_model, load_tokenizer
from server.service.adapter_service import AdapterService
from server.store import AdapterStore, recover_dir
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


def build_attention(
    settings: Settings, geometry: ModelGeometry, device: str, dtype, num_blocks: int
) -> AttentionBackend:
    """The attention backend with a KV cache of ``num_blocks`` usable blocks plus the padding block."""
    backend = attention_backend_class(settings.attention_backend, device)
    return backend(geometry, num_blocks + 1, settings.block_size, dtype, device)


def kv_cache_blocks(settings: Settings, model, slots, geometry: ModelGeometry, device: str, dtype) -> int:
    """``num_kv_blocks``; else on CUDA what ``gpu_memory_utilization`` leaves after the weights, the
    adapter slots and a profiled step (unless ``kv_cache_memory_gb`` was set); else ``kv_cache_memory_gb``."""
    backend = attention_backend_class(settings.attention_backend, device)
    per_block = backend.kv_bytes_per_block(geometry, settings.block_size, dtype)
    if settings.num_kv_blocks:
        return settings.num_kv_blocks
    if not device.startswith("cuda") or "kv_cache_memory_gb" in settings.model_fields_set:
        return max(2, int(settings.kv_cache_memory_gb * 2**30 // per_block))
    bs, tokens, seqs = settings.block_size, settings.max_num_batched_tokens, settings.max_num_seqs
    step = dummy_step(seqs, tokens, bs)
    for seq in step:
        seq.lora_slot = 0 if slots is not None else -1
    probe = build_attention(settings, geometry, device, dtype, sum(len(s.block_table) for s in step))
    runner = ModelRunner(
        model, probe, slots, max_num_seqs=seqs, max_num_batched_tokens=tokens, max_model_len=tokens
    )
    peak = profile_activation_peak(runner, step) + sampler_bytes(seqs, geometry.vocab_size)
    del runner, probe
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    budget = MemoryBudget(total, free, settings.gpu_memory_utilization, peak)
    min_blocks = -(-tokens // bs) + seqs
    if settings.max_model_len:
        min_blocks = max(min_blocks, -(-settings.max_model_len // bs))
    blocks = budget.kv_blocks(per_block, min_blocks)
    log.info("GPU memory: %.2f GiB in use, activation peak %.2f GiB, KV cache %.2f GiB (%d blocks)",
             budget.in_use / 2**30, peak / 2**30, blocks * per_block / 2**30, blocks)  # fmt: skip
    return blocks


def decode_graphs(settings: Settings, device: str) -> DecodeGraphs | None:
    """CUDA: decode padded to buckets, captured as CUDA graphs unless ``enforce_eager``. CPU: the
    decode forward compiled (``torch.compile``) at start-up with ``compile_decode``, else none."""
    if not device.startswith("cuda"):
        if settings.compile_decode and not settings.enforce_eager:
            return DecodeGraphs(CompiledDecode(), bucket_sizes(settings.max_num_seqs))
        return None
    strategy = EagerReplay() if settings.enforce_eager else CudaGraphCapture()
    return DecodeGraphs(strategy, bucket_sizes(settings.max_num_seqs))


def build_runtime(settings: Settings, model: torch.nn.Module | None = None, tokenizer=None) -> Runtime:
    """What ``settings`` describes. ``model``/``tokenizer``: an already built model (its attention
    already routed to ``hf_bridge``), e.g. a random-weight one built on the GPU by a benchmark."""
    device, dtype = settings.resolved_device(), settings.resolved_dtype()
    if torch.device(device).index is not None:  # --device cuda:N: kernels, graphs and memory figures there
        torch.cuda.set_device(torch.device(device))
    torch.manual_seed(settings.seed)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(settings.model)
    model = model if model is not None else load_model(settings.model, device, dtype)
    check_serving_model(model)
    dtype = next(model.parameters()).dtype  # a prebuilt model's own
    geometry = ModelGeometry.of(model.config)
    store = AdapterStore(settings.adapter_store)
    recover_dir(store.root)  # what a crash left: staging and trash directories, half-done exports
    recover_dir(settings.export_dir)
    lora = build_lora(model, settings, store)
    slots = lora.manager if lora is not None else None
    num_blocks = kv_cache_blocks(settings, model, slots, geometry, device, dtype)
    attention = build_attention(settings, geometry, device, dtype, num_blocks)
    max_model_len = min(
        settings.max_model_len or geometry.max_position_embeddings, num_blocks * settings.block_size
    )
    runner = ModelRunner(
        model, attention, slots, max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens, max_model_len=max_model_len,
        graphs=decode_graphs(settings, device),
    )  # fmt: skip
    runner.capture_decode_graphs()
    compile_seconds = getattr(runner.graphs.strategy, "compile_seconds", 0.0) if runner.graphs else 0.0
    if compile_seconds:
        log.info(
            "decode compiled for %d batch buckets in %.1f s", len(runner.graphs.replays), compile_seconds
        )
    scheduler = Scheduler(
        BlockManager(num_blocks, settings.block_size, settings.prefix_caching),
        settings.max_num_seqs,
        settings.max_num_batched_tokens,
        slots,
        AdmissionOrder(settings.adapter_max_wait_s),
        prefill_while_decoding=prefill_while_decoding(settings, device),
    )
    eos_ids = eos_token_ids(model, tokenizer)
    core = LLMEngine(
        runner, scheduler, Sampler(device, settings.seed, eos_ids), tokenizer,
        EngineLimits(max_model_len, eos_ids), slots,
    )  # fmt: skip
    name = settings.served_model_name or Path(settings.model).resolve().name
    served = ServedModel(name, tokenizer, max_model_len, geometry.vocab_size)
    engine = AsyncEngine(core, served, settings.max_queue_len, settings.engine_step_timeout_s)
    adapters = AdapterService(settings, store, lora, name, engine.stats)
    graphs = runner.graphs
    replay = "off" if graphs is None else graphs.strategy.name if graphs.active else graphs.disabled_reason
    log.info("built %s on %s (%s), attention %s, %d KV blocks, decode replay: %s", name, device, dtype,
             attention.name, num_blocks, replay)  # fmt: skip
    grammars = GrammarCompiler(tokenizer, geometry.vocab_size, eos_ids)
    return Runtime(settings, engine, adapters, lora, torch.device(device), dtype, grammars)


# Prompt tokens a CPU step that also decodes may take. Measured with `vllm bench serve` (64 requests at
# once, 64 in / 64 out, bench model, 2 cores): burst ITL p99 56-67 ms at 256, 86-102 ms at 512, and
# 176-278 ms in 2 of 3 rounds without a cap (a ~2,000-token prefill step); vLLM-CPU 51-232 ms.
CPU_PREFILL_WHILE_DECODING = 256


def prefill_while_decoding(settings: Settings, device: torch.device) -> int | None:
    """``max_prefill_tokens_while_decoding``, or its default: 256 on CPU, no cap on CUDA (a whole-budget
    prefill step takes milliseconds there, and smaller chunks would cost prefill throughput)."""
    if settings.max_prefill_tokens_while_decoding is not None:
        return settings.max_prefill_tokens_while_decoding
    return CPU_PREFILL_WHILE_DECODING if torch.device(device).type == "cpu" else None
