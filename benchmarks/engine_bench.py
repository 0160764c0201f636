"""Our engine vs transformers' generate() on the same prompts, device and dtype."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from benchmarks.roofline import ModelShape, decode_step_rate, gemm_peak, roofline_line
from benchmarks.workload import Target, Workload, timed
from server.bootstrap import Runtime, build_runtime
from server.config import Settings
from server.engine.sequence import Sequence
from server.engine.types import SamplingParams


def load_hf(model_dir: Path, target: Target) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=target.dtype).to(target.device).eval()
    param = next(model.parameters())
    print(f"  transformers model on {param.device}, {param.dtype}")
    return model


def hf_generate_tps(model, prompts: list[list[int]], new_tokens: int, target: Target, **extra) -> float:
    """Tokens/s of ``model.generate`` (transformers or PEFT) on one static batch of equal-length prompts."""
    ids = torch.tensor(prompts, device=target.device)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    warm = {k: v[:2] if isinstance(v, list) else v for k, v in extra.items()}
    with torch.inference_mode():
        model.generate(input_ids=ids[:2, :8], max_new_tokens=2, do_sample=False, pad_token_id=0, **warm)
        seconds, _ = timed(
            lambda: model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs, **extra),
            target,
        )
    return len(prompts) * new_tokens / seconds


def transformers_generate(
    model_dir: Path, prompts: list[list[int]], new_tokens: int, target: Target
) -> float:
    return hf_generate_tps(load_hf(model_dir, target), prompts, new_tokens, target)


def build_bench_runtime(model_dir: Path, target: Target, **overrides) -> Runtime:
    settings = Settings(
        model=model_dir, max_num_seqs=64, max_num_batched_tokens=2048, **target.settings(), **overrides
    )
    rt = build_runtime(settings)
    lora = rt.lora.model.backend.name if rt.lora is not None else "off"
    attention = rt.engine.core.runner.attention.name
    print(f"  loraplex on {rt.device}, {rt.dtype}; attention {attention}, LoRA backend {lora}")
    return rt


@dataclass(frozen=True)
class DecodeStep:
    """One engine step in which every scheduled sequence decoded one token (no prefill in it)."""

    seconds: float
    batch: int
    context: float  # mean tokens per sequence, its attention span
    lora_rows: int


def run_engine(
    rt: Runtime,
    prompts,
    new_tokens: int,
    target: Target,
    adapters: list[str] | None = None,
    decode_steps: list[DecodeStep] | None = None,
) -> float:
    """Tokens/s of our engine: all requests queued at once, stepped until done. Pure decode steps are
    appended to ``decode_steps`` when given (for the roofline line)."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    core = rt.engine.core

    def go():
        for i, p in enumerate(prompts):
            name = adapters[i % len(adapters)] if adapters else None
            ref = rt.adapters.resolve(name) if name else None
            core.add(Sequence(f"bench-{i}", p, params, ref))
        produced = 0
        while core.has_work():
            tokens_before = core.counters.batched_tokens
            start = time.perf_counter()
            results = core.step()
            seconds = time.perf_counter() - start
            produced += sum(len(out.new_token_ids) for _, out in results)
            if (
                decode_steps is not None
                and results
                and core.counters.batched_tokens - tokens_before == len(results)
            ):
                seqs = [seq for seq, _ in results]
                context = sum(len(s) for s in seqs) / len(seqs)
                decode_steps.append(
                    DecodeStep(seconds, len(seqs), context, sum(1 for s in seqs if s.adapter_key))
                )
        return produced

    for i, p in enumerate(prompts[:2]):  # warm-up
        core.add(Sequence(f"warm-{i}", p[:8], SamplingParams(max_tokens=2, temperature=0.0)))
    while core.has_work():
        core.step()
    seconds, produced = timed(go, target)
    assert produced == len(prompts) * new_tokens, produced
    return produced / seconds


def bench_engine(model_dir: Path, workload: Workload, target: Target) -> list[tuple[str, float]]:
    prompts = workload.prompts(32000)
    hf = transformers_generate(model_dir, prompts, workload.new_tokens, target)
    rt = build_bench_runtime(model_dir, target, enable_lora=False)
    steps: list[DecodeStep] = []
    ours = run_engine(rt, prompts, workload.new_tokens, target, decode_steps=steps)
    print_roofline(ModelShape.of_model(model_dir), steps, target)
    return [("transformers generate() static batch", hf), ("loraplex engine", ours)]


def print_roofline(shape: ModelShape, steps: list[DecodeStep], target: Target) -> None:
    """The engine's decode steps against the dense GEMM peak measured now (benchmarks/roofline.py)."""
    peak = gemm_peak(target.dtype, device=str(target.device))
    rate = decode_step_rate(steps, shape)
    print(
        f"  dense GEMM peak ({target.dtype}, 2048^3, best of torch.matmul and oneDNN): {peak / 1e9:.1f} GFLOP/s"
    )
    if rate:
        print(
            "  "
            + roofline_line(f"loraplex decode step @ batch {rate[1]} (median of {rate[2]})", rate[0], peak)
        )
