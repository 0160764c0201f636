"""Engine vs transformers generate() on the same prompts (issue: serving engine)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from server.bench.workload import Workload, timed
from server.config import Settings
from server.engine.async_engine import AsyncEngine
from server.engine.sequence import Sequence
from server.engine.types import AdapterRef, SamplingParams


def transformers_generate(model_dir: Path, prompts: list[list[int]], new_tokens: int) -> float:
    """Tokens/s of plain HF generate() on one static batch (all prompts have the same length)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor(prompts)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids[:2, :8], max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
        seconds, _ = timed(lambda: model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs))
    return len(prompts) * new_tokens / seconds


def run_engine(
    engine: AsyncEngine, prompts, new_tokens: int, adapters: list[str | None] | None = None
) -> float:
    """Tokens/s of our engine: all requests queued at once, stepped until done."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    core = engine.engine

    def go():
        for i, p in enumerate(prompts):
            name = adapters[i % len(adapters)] if adapters else None
            ref = AdapterRef(name=name) if name else None
            if ref is not None:
                engine.adapters.prefetch(ref)
            core.add(Sequence(f"bench-{i}", p, params, ref))
        produced = 0
        while core.has_work():
            for _, out in core.step():
                produced += len(out.new_token_ids)
        return produced

    go_warm = prompts[:2]
    for i, p in enumerate(go_warm):  # warm-up
        core.add(Sequence(f"warm-{i}", p[:8], SamplingParams(max_tokens=2, temperature=0.0)))
    while core.has_work():
        core.step()
    seconds, produced = timed(go)
    assert produced == len(prompts) * new_tokens, produced
    return produced / seconds


def bench_engine(model_dir: Path, workload: Workload) -> list[tuple[str, float]]:
    prompts = workload.prompts(32000)
    hf = transformers_generate(model_dir, prompts, workload.new_tokens)
    settings = Settings(model=model_dir, enable_lora=False, max_num_seqs=64, max_num_batched_tokens=2048)
    ours = run_engine(AsyncEngine(settings), prompts, workload.new_tokens)
    return [("transformers generate() static batch", hf), ("loraplex engine", ours)]
