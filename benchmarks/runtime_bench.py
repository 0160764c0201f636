"""``python -m benchmarks.runtime_bench [--quick] [--rounds N] [--dtype D]``: what each piece of the
CPU runtime set-up (server/runtime_env.py) is worth, in one alternating run.

Every configuration is a loraplex engine in its own process (``LD_PRELOAD`` only acts at process
start), built once; each round runs base and mixed-8 on every configuration in turn, and the table
gives medians and the ratio to the untuned process. Intel's OpenMP is taken from the vLLM peer's
virtualenv when ``make bench-peer`` installed it (pip ``intel-openmp``), LLVM's from Debian's
``libomp5-14``; a configuration whose library is missing is skipped and said so.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from benchmarks.peers.assets import build_assets
from benchmarks.peers.install import Peers
from benchmarks.peers.report import Samples
from benchmarks.peers.workers import Worker
from benchmarks.servers import REPO
from benchmarks.workload import Workload
from clients.loadgen.report import format_grid
from server.runtime_env import BIND_VARS, Pieces, library_dirs, plan, tuned_environ

NONE = Pieces(allocator=None, openmp=None, threads=False, bind=False)
CONFIGS = {
    "untuned (--no-runtime-tuning)": NONE,
    "tcmalloc": Pieces(allocator="tcmalloc", openmp=None, threads=False, bind=False),
    "jemalloc": Pieces(allocator="jemalloc", openmp=None, threads=False, bind=False),
    "huge pages": Pieces(allocator=None, openmp=None, threads=False, bind=False, huge_pages=True),
    "threads = cores, bound (GNU OpenMP)": Pieces(allocator=None, openmp=None),
    "tcmalloc + bound (GNU OpenMP)": Pieces(allocator="tcmalloc", openmp=None),
    "tcmalloc + LLVM OpenMP, unbound": Pieces(allocator="tcmalloc", openmp="llvm", bind=False),
    "tcmalloc + LLVM OpenMP + bound": Pieces(allocator="tcmalloc", openmp="llvm"),
    "tcmalloc + Intel OpenMP, unbound": Pieces(allocator="tcmalloc", openmp="intel", bind=False),
    "tcmalloc + Intel OpenMP + bound": Pieces(allocator="tcmalloc", openmp="intel"),
    "default (auto: what loraplex serve picks)": Pieces(),
    "default + huge pages (THP_MEM_ALLOC_ENABLE=1)": Pieces(huge_pages=True),
}


def config_env(pieces: Pieces, dirs: list[Path]) -> dict[str, str] | None:
    """The worker's environment, or None when a library the configuration names is not installed."""
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OMP_", "KMP_", "LD_PRELOAD", "THP_", "C10_THP"))
    }
    p = plan(base, pieces, dirs)
    if (pieces.allocator not in (None, "auto") and p.allocator is None) or (
        pieces.openmp not in (None, "auto") and p.openmp is None
    ):
        return None
    return base if pieces == NONE else tuned_environ(base, pieces, dirs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and workload, 1 round")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--only", nargs="+", help="configuration names (default: all)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds, stopping every worker
    peers = Peers()
    assets = build_assets(peers, "bench-quick" if args.quick else "bench")
    workload = Workload(num_requests=8, prompt_len=16, new_tokens=8) if args.quick else Workload()
    logs = REPO / "bench_results" / "runtime" / time.strftime("%Y%m%d-%H%M%S")
    logs.mkdir(parents=True, exist_ok=True)
    spec = logs / "spec.json"
    spec.write_text(json.dumps({
        "model": str(assets.model), "store": str(assets.store), "adapters": assets.adapters,
        "dtype": args.dtype, "prompts": workload.prompts(32000), "new_tokens": workload.new_tokens}))  # fmt: skip
    dirs = library_dirs() + [(peers.venv / "lib").resolve()]
    workers = start_workers(args.only or list(CONFIGS), spec, dirs, logs)
    try:
        samples = alternate(workers, args.rounds or (1 if args.quick else 3))
    finally:
        for w in workers.values():
            w.close()
    print_table(samples, list(workers), workload, args.dtype)
    print(f"logs in {logs}")
    return 0


def start_workers(names: list[str], spec: Path, dirs: list[Path], logs: Path) -> dict[str, Worker]:
    workers = {}
    for i, name in enumerate(names):
        # "default" looks where `loraplex serve` looks; the others may also use the peers' Intel OpenMP
        env = config_env(CONFIGS[name], library_dirs() if name.startswith("default") else dirs)
        if env is None:
            print(f"  {name}: skipped (its library is not installed)")
            continue
        argv = [sys.executable, "-m", "benchmarks.peers.loraplex_worker", spec]
        worker = Worker(name, argv, env, logs / f"config-{i}.log")
        worker.start()
        shown = [
            f"{k}={env[k]}"
            for k in ("LD_PRELOAD", "OMP_NUM_THREADS", *BIND_VARS, "THP_MEM_ALLOC_ENABLE")
            if k in env
        ]
        print(f"  {name}: {' '.join(shown) or 'nothing set'}", flush=True)
        workers[name] = worker
    return workers


def alternate(workers: dict[str, Worker], rounds: int) -> Samples:
    samples = Samples()
    for r in range(rounds):
        for mode in ("base", "mixed"):
            for name, worker in workers.items():
                tps = worker.run(mode, r + 1)["tokens_per_s"]
                samples.add((mode,), name, tps)
                print(f"  round {r + 1}: {mode:<5} {name:<42} {tps:8.1f} tok/s", flush=True)
    return samples


def print_table(samples: Samples, names: list[str], workload: Workload, dtype: str) -> None:
    untuned = {m: samples.median((m,), names[0]) for m in ("base", "mixed")}
    rows = []
    for name in names:
        base, mixed = samples.median(("base",), name), samples.median(("mixed",), name)
        rows.append([name, f"{base:.1f}", f"{base / untuned['base']:.2f}", f"{mixed:.1f}",
                     f"{mixed / untuned['mixed']:.2f}"])  # fmt: skip
    print(f"\nCPU runtime set-up, loraplex engine, {dtype}, {workload.num_requests} requests x "
          f"{workload.prompt_len} prompt x {workload.new_tokens} new tokens; tokens/s, medians")  # fmt: skip
    print(format_grid(["configuration", "base", "vs untuned", "mixed-8", "vs untuned"], rows))


if __name__ == "__main__":
    raise SystemExit(main())
