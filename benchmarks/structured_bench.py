"""Structured outputs' cost: one batch with half its requests constrained to a JSON schema vs none.

The benchmark model's shape with a byte-level BPE vocabulary of 32000 trained on the Python standard
library's sources (so JSON is expressible and the masks are as large as a real model's). The schema
needs far more tokens than the run generates (``minItems``), so every request produces exactly
``new_tokens`` in both runs and the batches have the same shape: the difference is the per-step mask
work (fill one bitmask row per constrained request, mask the batch's logits) alone. The grammar is
compiled before the timed part, as the API does before queueing. Runs alternate; since every run
has the same steps, each step's time is taken as its minimum over the runs (robust to a shared
machine's load), and the share of the constrained runs' time spent on grammar masks is reported too.
"""

from __future__ import annotations

import glob
import os
import statistics
import time
from pathlib import Path

from benchmarks.engine_bench import build_bench_runtime
from benchmarks.workload import Target, Workload
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


def _run(rt, prompts, new_tokens: int, grammar) -> list[float]:
    """Wall seconds of each engine step, with every other request constrained by ``grammar`` (none
    when it is None). Every run has the same steps (same prompts, same token counts)."""
    core = rt.engine.core
    for i, prompt in enumerate(prompts):
        constrained = grammar if grammar is not None and i % 2 == 0 else None
        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True, grammar=constrained)
        core.add(Sequence(f"s-{i}", prompt, params))
    produced, steps = 0, []
    while core.has_work():
        start = time.perf_counter()
        outputs = core.step()
        steps.append(time.perf_counter() - start)
        produced += sum(len(out.new_token_ids) for _, out in outputs)
    assert produced == len(prompts) * new_tokens, f"{produced} tokens: a constrained request ended early"
    return steps


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
    """Runs alternate; each step's time is the minimum over the repetitions (what a shared machine's
    load cannot inflate), and throughput is tokens / the sum of those minima."""
    model_dir = make_json_bench_model(tmp / "json-bench-llama", "bench-quick" if quick else "bench")
    rt = build_bench_runtime(model_dir, target, enable_lora=False)
    rt.grammars.prepare()
    grammar = rt.grammars.compile_sync(GrammarSpec.json_schema(SCHEMA))
    prompts = workload.prompts(len(rt.engine.served.tokenizer))
    _run(rt, prompts[:4], 4, grammar)  # warm-up, both paths
    runs: dict[str, list[list[float]]] = {"none": [], "half": []}
    shares = []
    for _ in range(REPEATS):
        runs["none"].append(_run(rt, prompts, workload.new_tokens, None))
        with GrammarTimer() as timer:
            runs["half"].append(_run(rt, prompts, workload.new_tokens, grammar))
        shares.append(timer.seconds / sum(runs["half"][-1]))
    tokens = len(prompts) * workload.new_tokens
    best = {k: sum(min(step) for step in zip(*v, strict=True)) for k, v in runs.items()}
    median = {k: statistics.median(sum(run) for run in v) for k, v in runs.items()}
    print(f"  {REPEATS} alternating runs of {len(runs['none'][0])} steps; median wall tokens/s: "
          f"none {tokens / median['none']:.1f}, half {tokens / median['half']:.1f}")  # fmt: skip
    print(
        f"  share of the constrained runs' time spent on grammar masks: median {statistics.median(shares):.2%}"
    )
    rows = [
        ("no request constrained", tokens / best["none"]),
        ("half the requests JSON-schema constrained", tokens / best["half"]),
    ]
    print_table("Structured outputs: mixed batch (tokens / sum of per-step minima)", rows, rows[0][0])
    rt.close()
