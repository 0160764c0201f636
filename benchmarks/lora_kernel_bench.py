"""``python -m benchmarks.lora_kernel_bench [--weights bfloat16] [--repeats N]``: the native CPU LoRA
kernel (server/lora/ops/csrc/sgmv_cpu.cpp) against the machine's limit, one decode step's calls at a time.

A mixed decode step calls the kernel once per LoRA target (q/k/v fused, o, gate/up fused, down, in
every layer), each time with weights nothing has read since the step before: ~150 MB of base weights
streamed in between evict them. So each call is timed three ways, in one run, on the peers' bench model
shapes (8 adapters of rank 16, 4 rows each, 32 rows): **hot** (the call repeated: its weights in cache,
the kernel's compute and fixed cost), **cold** (after reading 64 MB elsewhere, as in a step), and a
**plain read** of the same weight bytes cold (two ``sum``s: what reading them costs at the granularity of
one call, with no compute). A cold call near its plain read is bound by memory, not by its code; the
gap between hot and cold is what only overlapping the reads with other work could hide.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from clients.loadgen.report import format_grid
from server import runtime_env
from server.lora.ops.sgmv_cpu import sgmv_cpu_available, sgmv_cpu_rows
from server.lora.slot_weights import SlotWeights

# (name, members, in, outs) of one layer's targets on the bench model (hidden 512, 8 heads / 2 KV, MLP 1376)
TARGETS = [
    ("q/k/v", 3, 512, [512, 128, 128]),
    ("o", 1, 512, [512]),
    ("gate/up", 2, 512, [1376, 1376]),
    ("down", 1, 1376, [512]),
]
ADAPTERS, ROWS_EACH, RANK = 8, 4, 16


def target_weights(members: int, in_features: int, outs: list[int], dtype: torch.dtype) -> SlotWeights:
    weights = SlotWeights([f"m{j}" for j in range(members)], in_features, outs, ADAPTERS, RANK, "cpu", dtype)
    weights.a.normal_()
    weights.b.normal_()
    for j in range(members):
        weights.rank[j] = [RANK] * ADAPTERS
    weights._refresh_resident(range(ADAPTERS))
    return weights


def median_us(call, repeats: int, before=None) -> float:
    samples = []
    for _ in range(repeats):
        if before is not None:
            before()
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples[2:]) * 1e6


def measure(target, wdtype, xdtype, repeats: int, evict) -> tuple[float, float, float, int]:
    """(hot us, cold us, plain cold read us, weight bytes) of one target's kernel call."""
    _, members, in_features, outs = target
    w = target_weights(members, in_features, outs, wdtype)
    rows = torch.tensor([r for s in range(ADAPTERS) for r in range(s, ADAPTERS * ROWS_EACH, ADAPTERS)])
    slots = torch.arange(ADAPTERS).repeat_interleave(ROWS_EACH)
    x = torch.randn(len(rows), in_features, dtype=xdtype)
    y = torch.zeros(len(rows), sum(outs), dtype=xdtype)
    a, b = w.a[:ADAPTERS], w.b[:ADAPTERS]  # the live adapters' pages (identity layout: slot s, page s)

    def call():
        sgmv_cpu_rows(y, x, w, rows, slots)

    def read():
        a.sum(), b.sum()

    hot = median_us(call, repeats)
    return (
        hot,
        median_us(call, repeats, evict),
        median_us(read, repeats, evict),
        (a.numel() + b.numel()) * a.element_size(),
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--activations", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    runtime_env.reexec_if_needed(True, "cpu")  # the runtime `loraplex serve` runs the kernel under
    runtime_env.unpin_main_thread()
    if not sgmv_cpu_available():
        print("the native CPU kernel could not be built here")
        return 1
    wdtype, xdtype = getattr(torch, args.weights), getattr(torch, args.activations)
    elsewhere = torch.ones(64 * 2**20 // 4)  # read before a cold call: evicts every cache level
    table, totals = [], [0.0, 0.0, 0.0, 0]
    measure(TARGETS[0], wdtype, xdtype, 3, elsewhere.sum)  # warm-up: the first calls of a process run slow
    for target in TARGETS:
        hot, cold, read, nbytes = measure(target, wdtype, xdtype, args.repeats, elsewhere.sum)
        table.append([target[0], f"{nbytes / 1e6:.2f}", f"{hot:.1f}", f"{cold:.1f}", f"{read:.1f}",
                      f"{nbytes / cold / 1e3:.1f}"])  # fmt: skip
        for i, v in enumerate((hot, cold, read, nbytes)):
            totals[i] += v
    layers = 8
    print(f"native LoRA kernel, {ADAPTERS} adapters x rank {RANK} x {ROWS_EACH} rows, {args.weights} weights, "
          f"{args.activations} activations, {torch.get_num_threads()} threads; medians of {args.repeats}")  # fmt: skip
    print(format_grid(["target", "MB", "hot us", "cold us", "plain read, cold us", "cold GB/s"], table))
    hot, cold, read, nbytes = totals
    print(f"a decode step ({layers} layers): {layers * nbytes / 1e6:.1f} MB of adapter weights; hot "
          f"{layers * hot / 1e3:.2f} ms, cold {layers * cold / 1e3:.2f} ms, plain cold read {layers * read / 1e3:.2f} ms")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
