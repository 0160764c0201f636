"""Multi-LoRA benchmark: PEFT's mixed batch vs our engine (base, mixed, merged), cold loads, many adapters."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from benchmarks.engine_bench import build_bench_runtime, hf_generate_tps, load_hf, run_engine
from benchmarks.workload import Target, Workload

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BASE_ROW = "loraplex base only (LoRA layers idle)"
HALF_ROW = "loraplex mixed, 8 adapters, float16 slots"


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


def peft_mixed(
    model_dir: Path, store: Path, names: list[str], prompts, new_tokens: int, target: Target
) -> float:
    """Tokens/s of PEFT's own mixed-adapter batch: ``generate(..., adapter_names=[...])``."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_hf(model_dir, target), store / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(store / name, adapter_name=name)
    model.to(target.device, target.dtype).eval()
    per_row = [names[i % len(names)] for i in range(len(prompts))]
    return hf_generate_tps(model, prompts, new_tokens, target, adapter_names=per_row)


def preloaded_runtime(model_dir: Path, store: Path, target: Target, names: list[str], **overrides):
    """Our runtime with ``names`` parsed into host memory, so timing starts with them at hand."""
    rt = build_bench_runtime(model_dir, target, adapter_store=store, **overrides)
    for name in names:
        rt.lora.cache.get(name)  # parsed into host memory before timing
    return rt


def cold_load_seconds(model_dir: Path, store: Path, name: str, target: Target) -> float:
    """Disk -> parsed, validated host copy -> device slot, for one adapter."""
    rt = build_bench_runtime(model_dir, target, adapter_store=store, max_loras=1)
    start = time.perf_counter()
    rt.lora.cache.get(name)
    rt.lora.manager.activate({name})
    target.sync()
    return time.perf_counter() - start


def bench_lora(
    model_dir, workload: Workload, tmp: Path, target: Target, print_table, many_adapters=64
) -> None:
    store = tmp / "store"
    store.mkdir(exist_ok=True)
    prompts, new = workload.prompts(32000), workload.new_tokens
    names = make_adapters(model_dir, store, 8)
    rows = [
        (
            "transformers generate() (no LoRA)",
            hf_generate_tps(load_hf(model_dir, target), prompts, new, target),
        )
    ]
    rows.append(("PEFT mixed batch, 8 adapters", peft_mixed(model_dir, store, names, prompts, new, target)))
    rt = preloaded_runtime(model_dir, store, target, names, max_loras=8)
    rows.append((BASE_ROW, run_engine(rt, prompts, new, target)))
    rows.append(("loraplex mixed, 8 adapters", run_engine(rt, prompts, new, target, adapters=names)))
    del rt
    if target.dtype == torch.float32:  # --lora-dtype float16: half the adapter bytes a step streams
        rt = preloaded_runtime(model_dir, store, target, names, max_loras=8, lora_dtype="float16")
        rows.append((HALF_ROW, run_engine(rt, prompts, new, target, adapters=names)))
        del rt
    merged = build_bench_runtime(
        model_dir, target, adapter_store=store, merged_adapter=names[0], enable_lora=False
    )
    rows.append(("loraplex, 1 adapter merged", run_engine(merged, prompts, new, target)))
    del merged
    print_table("Multi-LoRA (rank 16, all 7 projections, round-robin)", rows, BASE_ROW)
    tps = dict(rows)
    print(
        f"ours mixed / ours base   = {tps['loraplex mixed, 8 adapters'] / tps[BASE_ROW]:.2f}  (target >= 0.85)"
    )
    if HALF_ROW in tps:
        print(f"ours mixed, float16 slots / ours base = {tps[HALF_ROW] / tps[BASE_ROW]:.2f}")
    print(
        f"ours mixed / PEFT mixed  = "
        f"{tps['loraplex mixed, 8 adapters'] / tps['PEFT mixed batch, 8 adapters']:.2f}  (target >= 1.7)"
    )
    print(
        f"ours merged / ours base  = {tps['loraplex, 1 adapter merged'] / tps[BASE_ROW]:.2f}  (target >= 0.98)"
    )
    print(
        f"PEFT mixed / transformers = "
        f"{tps['PEFT mixed batch, 8 adapters'] / tps['transformers generate() (no LoRA)']:.2f}"
    )
    cold = cold_load_seconds(model_dir, store, names[1], target)
    print(f"\nadapter cold load (disk -> servable, rank 16): {cold * 1000:.1f} ms")

    many = make_adapters(model_dir, store, many_adapters)
    slots = max(1, many_adapters // 4)
    rt = preloaded_runtime(model_dir, store, target, many, max_loras=slots, max_cpu_loras=many_adapters)
    many_prompts = (prompts * (many_adapters // len(prompts) + 1))[:many_adapters]
    many_tps = run_engine(rt, many_prompts, new, target, adapters=many)
    print(
        f"{many_adapters} distinct adapters, max_loras={slots}, {many_adapters} requests "
        f"(one per adapter): {many_tps:.1f} tokens/s"
    )
