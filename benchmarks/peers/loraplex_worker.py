"""loraplex's side of the offline peer benchmark: ``python -m benchmarks.peers.loraplex_worker SPEC``.

Runs in its own process so it gets the runtime set-up ``loraplex serve`` gives users (tcmalloc, tuned
OpenMP: the parent starts it under ``server.runtime_env.tuned_environ``), like the peers get theirs.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from benchmarks.engine_bench import DecodeStep, run_engine
from benchmarks.lora_bench import preloaded_runtime
from benchmarks.peers.protocol import round_prompts, serve
from benchmarks.roofline import dram_read_bandwidth, gemm_peak
from benchmarks.workload import Target
from server.engine.sequence import Sequence
from server.engine.types import SamplingParams


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    target = Target.parse("cpu", spec["dtype"])
    start = time.perf_counter()
    # The KV cache is sized for the workload (32 x 128 tokens need a few MB), not the server's 1 GB
    # default: the runtime benchmark keeps a worker per configuration alive at once.
    rt = preloaded_runtime(
        Path(spec["model"]), Path(spec["store"]), target, spec["adapters"], max_loras=len(spec["adapters"]),
        kv_cache_memory_gb=spec.get("kv_cache_memory_gb", 0.25),
    )  # fmt: skip
    start_s = time.perf_counter() - start
    prompts, new_tokens = spec["prompts"], spec["new_tokens"]

    def run(command: dict) -> dict:
        steps: list[DecodeStep] = []
        adapters = spec["adapters"] if command["mode"] == "mixed" else None
        batch = round_prompts(prompts, command.get("round", 1))
        tps = run_engine(rt, batch, new_tokens, target, adapters=adapters, decode_steps=steps)
        return {"tokens_per_s": tps, "decode_steps": [asdict(s) for s in steps]}

    def probe(command: dict) -> dict:
        return {name: greedy(rt, prompts[i], command["tokens"], adapter) for i, (name, adapter) in
                enumerate([("base", None), ("adapter", spec["adapters"][1])])}  # fmt: skip

    def peak(command: dict) -> dict:
        return {"flops": gemm_peak(target.dtype), "dram_bytes_per_s": dram_read_bandwidth()}

    serve({"run": run, "probe": probe, "peak": peak}, start_s)


def greedy(rt, prompt: list[int], tokens: int, adapter: str | None) -> list[int]:
    core = rt.engine.core
    ref = rt.adapters.resolve(adapter) if adapter else None
    core.add(
        Sequence("probe", prompt, SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True), ref)
    )
    out: list[int] = []
    while core.has_work():
        for _, result in core.step():
            out += result.new_token_ids
    return out


if __name__ == "__main__":
    torch.manual_seed(0)
    main(sys.argv[1])
