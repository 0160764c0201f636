"""loraplex vs the naive PEFT server: sustainable throughput at the same p99 TTFT SLO.

Builds (or reuses) a model and N synthetic PEFT adapters locally, then for each server - ours
(``python -m server serve``) and ``scripts/baseline_server.py`` - starts it as a subprocess on loopback,
uploads the adapters through the HTTP API, sweeps offered load with the same seeded workload (Poisson
arrivals, Zipf adapter popularity), and stops it. Prints one table with the highest rate each sustains
under the SLO and the ratio; writes ``compare.json``, ``sweep.png`` and ``latency_cdf.png``.

    python scripts/compare_baseline.py --adapters 32 --slo-ttft-p99 2.0
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.servers import ServerProcess, free_port  # noqa: E402
from clients import AsyncLoraplexClient  # noqa: E402
from clients.loadgen import (  # noqa: E402
    ArrivalSpec,
    LengthSpec,
    PopularitySpec,
    RunConfig,
    WorkloadSpec,
    run_sweep,
)
from clients.loadgen.prompts import PromptFactory  # noqa: E402
from clients.loadgen.report import format_grid  # noqa: E402
from clients.loadgen.sweep import SweepResult, SweepSearch  # noqa: E402

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def make_adapters(model_dir: Path, root: Path, count: int, rank: int) -> dict[str, Path]:
    """``count`` random (non-identity) PEFT adapters, saved as PEFT would; reused when already there."""
    names = {f"syn-r{rank}-{i:04d}": root / f"syn-r{rank}-{i:04d}" for i in range(count)}
    missing = [n for n, p in names.items() if not (p / "adapter_model.safetensors").exists()]
    if missing:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        for name in missing:
            torch.manual_seed(int(name.rsplit("-", 1)[1]) + 1000)
            config = LoraConfig(
                r=rank, lora_alpha=2 * rank, target_modules=ATTENTION, init_lora_weights=False
            )
            model = get_peft_model(base, config)
            model.save_pretrained(names[name])
            base = model.unload()
    return names


def resolve_model(arg: Path | None, work: Path) -> Path:
    if arg is not None:
        return arg
    demo = REPO / "models" / "demo"
    if (demo / "config.json").exists():
        return demo
    from benchmarks.workload import make_bench_model  # the engine benchmark's ~55M Llama

    return make_bench_model(work / "bench-model")


def ours(args, model: Path, work: Path, port: int) -> ServerProcess:
    store = work / "ours-store"
    if store.exists():
        import shutil

        shutil.rmtree(store)
    env = {
        "LORAPLEX_MODEL": str(model),
        "LORAPLEX_ADAPTER_STORE": str(store),
        "LORAPLEX_HOST": "127.0.0.1",
        "LORAPLEX_PORT": str(port),
        "LORAPLEX_DEVICE": args.device,
        "LORAPLEX_MAX_LORAS": str(args.max_loras),
        "LORAPLEX_MAX_NUM_SEQS": str(args.max_num_seqs),
        "LORAPLEX_MAX_CPU_LORAS": str(max(args.adapters, 1)),
    }
    argv = [sys.executable, "-m", "server", "serve", "--log-level", "warning"]
    return ServerProcess("loraplex", argv, port, work / "ours.log", env, args.torch_threads)


def baseline(args, model: Path, work: Path, port: int) -> ServerProcess:
    argv = [sys.executable, str(REPO / "scripts" / "baseline_server.py"), "--model", str(model),
            "--port", str(port), "--device", args.device]  # fmt: skip
    return ServerProcess("naive PEFT", argv, port, work / "baseline.log", threads=args.torch_threads)


async def sweep_server(
    server: ServerProcess, adapters: dict[str, Path], args, prompts
) -> tuple[SweepResult, dict]:
    async with AsyncLoraplexClient(
        server.url, timeout=args.request_timeout, max_connections=args.concurrency
    ) as c:
        t0 = time.monotonic()
        for name, path in adapters.items():
            await c.upload_adapter(path, name)
        print(
            f"[{server.label}] uploaded {len(adapters)} adapters in {time.monotonic() - t0:.1f} s", flush=True
        )
        spec = WorkloadSpec(
            ArrivalSpec(args.start_rate, "poisson"),
            PopularitySpec(tuple(adapters), "zipf", args.zipf_alpha),
            LengthSpec.parse(args.input_len),
            LengthSpec.parse(args.output_len),
            num_requests=args.num_requests,
            duration_s=args.duration,
            seed=args.seed,
        )
        config = RunConfig(await c.base_model(), args.concurrency, args.drain_timeout)
        # Warm-up outside the measurement (first-request compilation, allocator growth).
        await c.complete(prompts.prompt(10**6, 16), next(iter(adapters)), max_tokens=4, temperature=0)

        def show(point) -> None:
            r = point.report
            print(f"[{server.label}] {point.rate:7.2f} req/s offered -> {r.request_throughput:6.2f} req/s, "
                  f"{r.output_token_throughput:7.1f} tok/s, p99 TTFT {r.ttft.p99 * 1000:8.0f} ms, "
                  f"{r.requests} reqs, errors {r.error_count}: {'ok' if point.ok else 'misses SLO'}", flush=True)  # fmt: skip

        search = SweepSearch(
            rates=args.rates,
            start_rate=args.start_rate,
            max_rate=args.max_rate,
            refine_steps=args.refine_steps,
            on_point=show,
        )
        return await run_sweep(
            c, spec, config, args.slo_ttft_p99, prompts=prompts, progress=not args.no_progress, **search
        )


def table(results: dict[str, SweepResult], slo: float) -> str:
    rows = []
    for label, r in results.items():
        best = r.best
        rows.append([
            label,
            f"{r.sustainable_rate:.2f}",
            f"{r.sustainable_throughput:.2f}",
            f"{r.sustainable_token_throughput:.1f}",
            f"{best.report.ttft.p99 * 1000:.0f}" if best else "-",
            f"{best.report.e2e.p50 * 1000:.0f}" if best else "-",
        ])  # fmt: skip
    header = ["server", "max rate @SLO", "req/s", "out tok/s", "p99 TTFT ms", "p50 e2e ms"]
    return f"sustainable throughput under p99 TTFT <= {slo * 1000:.0f} ms\n" + format_grid(header, rows)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--model", type=Path, help="HF model dir (default: models/demo, else the ~55M bench model)"
    )
    p.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "loraplex-compare")
    p.add_argument("--out-dir", type=Path, default=REPO / "bench_results" / "compare")
    p.add_argument("--adapters", type=int, default=32, help="synthetic PEFT adapters (<= 1000)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--zipf-alpha", type=float, default=1.0)
    p.add_argument("--input-len", default="uniform:16:64")
    p.add_argument(
        "--prompt-source", choices=["words", "vocab"], default="vocab", help="random words or tokens"
    )
    p.add_argument("--output-len", default="uniform:8:32")
    p.add_argument("--slo-ttft-p99", type=float, default=2.0, help="seconds")
    p.add_argument(
        "--rates", type=lambda s: [float(x) for x in s.split(",")], help="fixed rates instead of a search"
    )
    p.add_argument("--start-rate", type=float, default=0.5)
    p.add_argument("--max-rate", type=float, default=256.0)
    p.add_argument("--refine-steps", type=int, default=2)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals per point")
    p.add_argument("--num-requests", type=int, default=1000, help="cap per point")
    p.add_argument("--concurrency", type=int, default=128)
    p.add_argument("--drain-timeout", type=float, default=30.0)
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument("--max-loras", type=int, default=8, help="our server's device adapter slots")
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--torch-threads", type=int, help="OMP_NUM_THREADS for both servers (1 is steadier on a shared CPU)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", choices=["loraplex", "baseline"], help="run one side only")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    model = resolve_model(args.model, args.work_dir)
    adapters = make_adapters(model, args.work_dir / "adapters", args.adapters, args.rank)
    from transformers import AutoTokenizer

    prompts = PromptFactory(args.seed, AutoTokenizer.from_pretrained(model), args.prompt_source)
    print(
        f"model {model}, {len(adapters)} adapters (rank {args.rank}), SLO p99 TTFT {args.slo_ttft_p99} s",
        flush=True,
    )

    servers = {"loraplex": ours, "naive PEFT": baseline}
    if args.only:
        servers = {k: v for k, v in servers.items() if (k == "loraplex") == (args.only == "loraplex")}
    results: dict[str, SweepResult] = {}
    runs: dict[str, dict] = {}
    for label, make in servers.items():
        with make(args, model, args.work_dir, free_port()) as server:
            results[label], runs[label] = asyncio.run(sweep_server(server, adapters, args, prompts))

    print()
    print(table(results, args.slo_ttft_p99))
    ratios = {}
    if len(results) == 2 and results["naive PEFT"].best is not None:
        ours_r, base_r = results["loraplex"], results["naive PEFT"]
        ratios = {
            "offered_rate": ours_r.sustainable_rate / base_r.sustainable_rate,
            "achieved_throughput": ours_r.sustainable_throughput / base_r.sustainable_throughput,
            "output_tokens_per_s": ours_r.sustainable_token_throughput / base_r.sustainable_token_throughput,
        }
        print(
            f"loraplex / naive PEFT at the same SLO: {ratios['offered_rate']:.1f}x the offered rate, "
            f"{ratios['achieved_throughput']:.1f}x achieved req/s, {ratios['output_tokens_per_s']:.1f}x output tok/s"
        )
    summary = {
        "model": str(model),
        "adapters": len(adapters),
        "rank": args.rank,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": {label: r.to_dict() for label, r in results.items()},
        "ratios": ratios,
    }
    (args.out_dir / "compare.json").write_text(json.dumps(summary, indent=2))
    from clients.loadgen.plots import plot_latency_cdf, plot_sweep

    plot_sweep(results, args.out_dir / "sweep.png")
    best_runs = {f"{label} @ {r.best.rate:.2f} req/s": runs[label][r.best.rate].records
                 for label, r in results.items() if r.best is not None}  # fmt: skip
    if best_runs:
        plot_latency_cdf(best_runs, args.out_dir / "latency_cdf.png")
    print(f"wrote {args.out_dir}/compare.json, sweep.png, latency_cdf.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
