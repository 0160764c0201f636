"""``python -m benchmarks [--lora] [--structured] [--device cuda --dtype bfloat16]``: tokens/s tables
with ratios against the peers (transformers, PEFT) or the unconstrained batch, every system on the same
device and dtype in one run."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from benchmarks.engine_bench import bench_engine
from benchmarks.workload import Target, Workload, make_bench_model


def print_table(title: str, rows: list[tuple[str, float]], baseline: str) -> None:
    base = dict(rows)[baseline]
    print(f"\n{title}")
    print(f"{'configuration':<46} {'tokens/s':>10} {'ratio':>8}")
    print("-" * 66)
    for name, tps in rows:
        print(f"{name:<46} {tps:>10.1f} {tps / base:>8.2f}")
    print(f"(ratio = tokens/s / '{baseline}')")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lora", action="store_true", help="also run the multi-LoRA benchmark")
    parser.add_argument("--only-lora", action="store_true", help="run only the multi-LoRA benchmark")
    parser.add_argument(
        "--structured",
        action="store_true",
        help="run only the structured-outputs benchmark (half the batch JSON)",
    )
    parser.add_argument("--model-dir", type=Path, default=None, help="reuse a built benchmark model")
    parser.add_argument("--quick", action="store_true", help="tiny model and workload: a smoke run")
    parser.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda' or 'cuda:N'")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    args = parser.parse_args()
    target = Target.parse(args.device, args.dtype)
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {target.device}, {target.dtype}"
    )
    workload = Workload(num_requests=8, prompt_len=16, new_tokens=8) if args.quick else Workload()
    with tempfile.TemporaryDirectory() as tmp:
        if args.structured:
            from benchmarks.structured_bench import bench_structured

            shorter = (
                Workload(num_requests=8, prompt_len=16, new_tokens=8) if args.quick else Workload(32, 32, 32)
            )
            bench_structured(Path(tmp), shorter, target, args.quick, print_table)
            return
        model_dir = make_bench_model(
            args.model_dir or Path(tmp) / "bench-llama", "bench-quick" if args.quick else "bench"
        )
        print(
            f"workload: {workload.num_requests} requests, prompt {workload.prompt_len}, "
            f"{workload.new_tokens} new tokens, greedy, EOS ignored; model {model_dir}"
        )
        if not args.only_lora:
            rows = bench_engine(model_dir, workload, target)
            print_table("Engine vs transformers", rows, "transformers generate() static batch")
        if args.lora or args.only_lora:
            from benchmarks.lora_bench import bench_lora

            bench_lora(
                model_dir, workload, Path(tmp), target, print_table, many_adapters=8 if args.quick else 64
            )


if __name__ == "__main__":
    main()
