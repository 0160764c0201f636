"""Multi-LoRA benchmark: PEFT's mixed batch vs our engine (base, mixed, merged), cold loads, many adapters."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from server.bench.engine_bench import run_engine, transformers_generate
from server.bench.workload import Workload, timed
from server.config import Settings
from server.engine.async_engine import AsyncEngine
from server.engine.types import AdapterRef

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(model_dir: Path, store: Path, count: int, rank: int = 16) -> list[str]:
    """``count`` PEFT adapters with random (non-zero) A and B on all seven projections."""
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    names = []
    for i in range(count):
        name = f"bench-r{rank}-{i}"
        if not (store / name / "adapter_model.safetensors").exists():
            torch.manual_seed(1000 + i)
            config = LoraConfig(
                r=rank, lora_alpha=2 * rank, target_modules=ALL_LINEAR, init_lora_weights=False
            )
            peft_model = get_peft_model(base, config)
            peft_model.save_pretrained(store / name)
            base = peft_model.unload()
        names.append(name)
    return names


def peft_mixed(model_dir: Path, store: Path, names: list[str], prompts, new_tokens: int) -> float:
    """Tokens/s of PEFT's own mixed-adapter batch: ``generate(..., adapter_names=[...])``."""
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, store / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(store / name, adapter_name=name)
    model.eval()
    per_row = [names[i % len(names)] for i in range(len(prompts))]
    ids = torch.tensor(prompts)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        model.generate(input_ids=ids[:2, :8], adapter_names=per_row[:2], max_new_tokens=2, pad_token_id=0)
        seconds, _ = timed(
            lambda: model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=per_row, **kwargs
            )
        )
    return len(prompts) * new_tokens / seconds


def _engine(model_dir: Path, store: Path, **overrides) -> AsyncEngine:
    settings = Settings(
        model=model_dir, adapter_store=store, max_num_seqs=64, max_num_batched_tokens=2048, **overrides
    )
    return AsyncEngine(settings)


def _preload(engine: AsyncEngine, names: list[str]) -> None:
    for name in names:
        engine.adapters.load_now(name)


def cold_load_seconds(model_dir: Path, store: Path, name: str) -> float:
    """Disk -> parsed, validated host copy -> device slot, for one adapter."""
    engine = _engine(model_dir, store, max_loras=1)
    start = time.perf_counter()
    engine.adapters.load_now(name)
    engine.adapters.activate({AdapterRef(name=name).key})
    return time.perf_counter() - start


def bench_lora(model_dir: Path, workload: Workload, tmp: Path, print_table, many_adapters: int = 64) -> None:
    store = tmp / "store"
    store.mkdir(exist_ok=True)
    prompts = workload.prompts(32000)
    new = workload.new_tokens
    names = make_adapters(model_dir, store, 8)

    rows = [("transformers generate() (no LoRA)", transformers_generate(model_dir, prompts, new))]
    rows.append(("PEFT mixed batch, 8 adapters", peft_mixed(model_dir, store, names, prompts, new)))
    engine = _engine(model_dir, store, max_loras=8)
    _preload(engine, names)
    rows.append(("loraplex base only (LoRA layers idle)", run_engine(engine, prompts, new)))
    rows.append(("loraplex mixed, 8 adapters", run_engine(engine, prompts, new, adapters=names)))
    del engine
    merged = _engine(model_dir, store, merged_adapter=names[0], enable_lora=False)
    rows.append(("loraplex, 1 adapter merged", run_engine(merged, prompts, new)))
    del merged
    print_table(
        "Multi-LoRA (rank 16, all 7 projections, round-robin)", rows, "loraplex base only (LoRA layers idle)"
    )
    tps = dict(rows)
    ours_base, ours_mixed = tps["loraplex base only (LoRA layers idle)"], tps["loraplex mixed, 8 adapters"]
    print(f"ours mixed / ours base   = {ours_mixed / ours_base:.2f}  (target >= 0.85)")
    print(
        f"ours mixed / PEFT mixed  = {ours_mixed / tps['PEFT mixed batch, 8 adapters']:.2f}  (target >= 1.7)"
    )
    print(f"ours merged / ours base  = {tps['loraplex, 1 adapter merged'] / ours_base:.2f}  (target >= 0.98)")
    print(
        f"PEFT mixed / transformers = "
        f"{tps['PEFT mixed batch, 8 adapters'] / tps['transformers generate() (no LoRA)']:.2f}"
    )

    print(
        f"\nadapter cold load (disk -> servable, rank 16): {cold_load_seconds(model_dir, store, names[1]) * 1000:.1f} ms"
    )

    many = make_adapters(model_dir, store, many_adapters)
    slots = max(1, many_adapters // 4)
    engine = _engine(model_dir, store, max_loras=slots, max_cpu_loras=many_adapters)
    _preload(engine, many)
    many_prompts = (prompts * (many_adapters // len(prompts) + 1))[:many_adapters]
    many_tps = run_engine(engine, many_prompts, new, adapters=many)
    print(
        f"{many_adapters} distinct adapters, max_loras={slots}, {many_adapters} requests "
        f"(one per adapter): {many_tps:.1f} tokens/s"
    )
