"""Structured outputs' cost: one batch with half its requests constrained to a JSON schema vs none.

The benchmark model's shape with a byte-level BPE vocabulary of 32000 trained on the Python standard
library's sources (so JSON is expressible and the masks are as large as a real model's). The schema
needs far more tokens than the run generates (``minItems``), so every request produces exactly
``new_tokens`` in both runs and the batches have the same shape: the difference is the per-step mask
work (fill one bitmask row per constrained request, mask the batch's logits) alone. The grammar is
compiled before the timed part, as the API does before queueing. Runs alternate (the pair sees the
same machine load) and the median of the pairs' ratios is reported, with the share of the
constrained runs' time spent on grammar masks (what a busy shared machine cannot blur).
"""

from __future__ import annotations

import glob
import os
import statistics
import time
from pathlib import Path

from benchmarks.engine_bench import build_bench_runtime
from benchmarks.workload import Target, Workload, timed
from server.engine import logits_processors
from server.engine.sequence import Sequence
from server.engine.types import SamplingParams
from server.model.synthetic import byte_bpe_tokenizer, make_random_model, model_config
from server.structured.spec import GrammarSpec

REPEATS = 5
SCHEMA = {
    "type": "object",
    "properties": {
        "log": {
            "type": "array",
            "minItems": 200,
            "items": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer"},
                    "tag": {"enum": ["alpha", "beta", "gamma"]},
                    "note": {"type": "string", "maxLength": 12},
                    "ok": {"type": "boolean"},
                },
                "required": ["id", "tag", "note", "ok"],
            },
        }
    },
    "required": ["log"],
}


def stdlib_corpus(max_files: int = 1500):
    """The standard library's Python sources: a local corpus big enough for a 32000-token BPE."""
    for path in sorted(glob.glob(os.path.dirname(os.__file__) + "/**/*.py", recursive=True))[:max_files]:
        with open(path, encoding="utf-8", errors="ignore") as f:
            yield f.read()


def make_json_bench_model(out_dir: Path, shape: str) -> Path:
    if (out_dir / "model.safetensors").exists():
        return out_dir
    config = model_config("llama", shape)
    tokenizer = byte_bpe_tokenizer(config.vocab_size, stdlib_corpus())
    return make_random_model(out_dir, config, tokenizer, seed=0)


def _run(rt, prompts, new_tokens: int, grammar, target: Target) -> tuple[float, float]:
    """Tokens per wall second and per CPU second of this process, with every other request
    constrained by ``grammar`` (none when it is None). On a shared machine the CPU figure is the
    steadier one: other processes' load stretches wall time, not the work this process does."""
    core = rt.engine.core

    def go() -> int:
        for i, prompt in enumerate(prompts):
            constrained = grammar if grammar is not None and i % 2 == 0 else None
            params = SamplingParams(
                max_tokens=new_tokens, temperature=0.0, ignore_eos=True, grammar=constrained
            )
            core.add(Sequence(f"s-{i}", prompt, params))
        produced = 0
        while core.has_work():
            for _, out in core.step():
                produced += len(out.new_token_ids)
        return produced

    cpu = time.process_time()
    seconds, produced = timed(go, target)
    cpu = time.process_time() - cpu
    assert produced == len(prompts) * new_tokens, f"{produced} tokens: a constrained request ended early"
    return produced / seconds, produced / cpu


class GrammarTimer:
    """Wall time the engine thread spends on grammar masks (filling and applying them) during a run."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._inner = logits_processors.apply_grammars

    def __enter__(self) -> GrammarTimer:
        def timed_apply(logits, seqs):
            start = time.perf_counter()
            self._inner(logits, seqs)
            self.seconds += time.perf_counter() - start

        logits_processors.apply_grammars = timed_apply
        return self

    def __exit__(self, *exc) -> None:
        logits_processors.apply_grammars = self._inner


def bench_structured(tmp: Path, workload: Workload, target: Target, quick: bool, print_table) -> None:
    model_dir = make_json_bench_model(tmp / "json-bench-llama", "bench-quick" if quick else "bench")
    rt = build_bench_runtime(model_dir, target, enable_lora=False)
    rt.grammars.prepare()
    grammar = rt.grammars.compile_sync(GrammarSpec.json_schema(SCHEMA))
    prompts = workload.prompts(len(rt.engine.served.tokenizer))
    _run(rt, prompts[:4], 4, grammar, target)  # warm-up, both paths
    free, half, shares = [], [], []
    for _ in range(REPEATS):  # back to back, so both see the same machine load
        free.append(_run(rt, prompts, workload.new_tokens, None, target))
        with GrammarTimer() as timer:
            start = time.perf_counter()
            half.append(_run(rt, prompts, workload.new_tokens, grammar, target))
            shares.append(timer.seconds / (time.perf_counter() - start))
    for unit, k in (("wall", 0), ("CPU", 1)):
        ratios = [h[k] / f[k] for f, h in zip(free, half, strict=True)]
        print(f"  tokens per {unit} s, none constrained: {[round(f[k], 1) for f in free]}; "
              f"half: {[round(h[k], 1) for h in half]}; half/none per pair: {[round(r, 3) for r in ratios]}")  # fmt: skip
    print(
        f"  share of the constrained runs' wall time spent on grammar masks: median {statistics.median(shares):.2%}"
    )
    rows = []
    for unit, k in (("wall", 0), ("CPU", 1)):
        rows.append(
            (
                f"none constrained, tokens per {unit} s (median of {REPEATS})",
                statistics.median(f[k] for f in free),
            )
        )
        rows.append((f"half JSON-schema constrained, per {unit} s", statistics.median(h[k] for h in half)))
    print_table("Structured outputs: mixed batch (wall)", rows[:2], rows[0][0])
    print_table("Structured outputs: mixed batch (CPU time of this process)", rows[2:], rows[2][0])
    rt.close()
