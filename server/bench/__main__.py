"""``python -m server.bench [--lora]``: prints tokens/s tables with ratios against the peers."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from server.bench.engine_bench import bench_engine
from server.bench.workload import QUICK_CONFIG, Workload, make_bench_model


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
    parser.add_argument("--model-dir", type=Path, default=None, help="reuse a built benchmark model")
    parser.add_argument("--quick", action="store_true", help="tiny model and workload: a smoke run")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device cpu")
    workload = Workload(num_requests=8, prompt_len=16, new_tokens=8) if args.quick else Workload()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_bench_model(
            args.model_dir or Path(tmp) / "bench-llama", QUICK_CONFIG if args.quick else None
        )
        print(
            f"workload: {workload.num_requests} requests, prompt {workload.prompt_len}, "
            f"{workload.new_tokens} new tokens, greedy, EOS ignored; model {model_dir}"
        )
        if not args.only_lora:
            rows = bench_engine(model_dir, workload)
            print_table("Engine vs transformers", rows, "transformers generate() static batch")
        if args.lora or args.only_lora:
            from server.bench.lora_bench import bench_lora

            bench_lora(model_dir, workload, Path(tmp), print_table, many_adapters=8 if args.quick else 64)


if __name__ == "__main__":
    main()
