"""``loadtest``: the load generator's command line (mounted by :mod:`clients.cli`)."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from clients.client import AsyncLoraplexClient
from clients.loadgen.prompts import PromptFactory
from clients.loadgen.runner import RunConfig
from clients.loadgen.session import run_load, run_sweep
from clients.loadgen.sweep import SweepPoint, SweepSearch
from clients.loadgen.target import check_target
from clients.loadgen.workload import (
    MAX_ADAPTERS,
    MAX_DURATION_S,
    MAX_REQUESTS,
    ArrivalSpec,
    LengthSpec,
    PopularitySpec,
    WorkloadSpec,
)


def _rates(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def add_parser(subparsers, parent: argparse.ArgumentParser) -> None:
    """Adds ``loadtest`` (with ``parent``'s connection options) to an argparse subparsers object."""
    p = subparsers.add_parser(
        "loadtest",
        parents=[parent],
        help="open-loop multi-adapter load test (loopback only unless --allow-remote)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--allow-remote", metavar="URL", help="permit this exact non-loopback URL as the target")
    p.add_argument("--model", help="base model name (default: asked from /v1/models)")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--adapters", type=int, default=0, help="use the first N adapters the server lists")
    who.add_argument("--adapter-names", help="comma-separated adapter names")
    p.add_argument("--popularity", choices=["uniform", "zipf"], default="uniform")
    p.add_argument("--zipf-alpha", type=float, default=1.0)
    p.add_argument("--base-fraction", type=float, default=0.0, help="share of requests to the base model")
    p.add_argument("--arrival", choices=["poisson", "gamma"], default="poisson")
    p.add_argument("--rate", type=float, default=4.0, help="offered req/s (sweep search: start rate)")
    p.add_argument("--cv", type=float, default=1.0, help="gamma coefficient of variation")
    p.add_argument("--num-requests", type=int, default=200, help=f"at most this many (<= {MAX_REQUESTS})")
    p.add_argument(
        "--duration", type=float, default=60.0, help=f"arrivals stop after s (<= {MAX_DURATION_S:.0f})"
    )
    p.add_argument("--concurrency", type=int, default=64, help="open connections cap")
    p.add_argument("--drain-timeout", type=float, default=60.0, help="wait after the last arrival, s")
    p.add_argument("--input-len", type=LengthSpec.parse, default=LengthSpec("fixed", value=32))
    p.add_argument("--output-len", type=LengthSpec.parse, default=LengthSpec("fixed", value=16))
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--no-ignore-eos", action="store_true", help="let EOS end requests early")
    p.add_argument("--tokenizer", type=Path, help="local tokenizer dir for exact prompt lengths")
    p.add_argument(
        "--prompt-source", choices=["words", "vocab"], default="words", help="vocab: random tokenizer tokens"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sweep", type=_rates, metavar="R1,R2,...", help="run these rates")
    p.add_argument("--sweep-search", action="store_true", help="search the max rate under the SLO")
    p.add_argument("--max-rate", type=float, default=1000.0)
    p.add_argument("--slo-ttft-p99", type=float, default=1.0, help="SLO on p99 TTFT, seconds")
    p.add_argument("--json", type=Path, help="write the report(s) here")
    p.add_argument("--plot-dir", type=Path, help="write PNG plots here (needs matplotlib)")
    p.add_argument(
        "--metrics-interval",
        type=float,
        default=0.0,
        help="sample the server's /metrics every S seconds for the adapter timeline (0: off)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_loadtest)


async def _resolve_names(client: AsyncLoraplexClient, args: argparse.Namespace) -> tuple[str, list[str]]:
    base = args.model or await client.base_model()
    if args.adapter_names:
        return base, [n.strip() for n in args.adapter_names.split(",") if n.strip()]
    if args.adapters <= 0:
        return base, []
    if args.adapters > MAX_ADAPTERS:
        raise ValueError(f"--adapters is capped at {MAX_ADAPTERS}")
    names = [a.name for a in await client.list_adapters()]
    if len(names) < args.adapters:
        raise ValueError(f"server has {len(names)} adapters, --adapters asks for {args.adapters}")
    return base, names[: args.adapters]


def _print_point(point: SweepPoint) -> None:
    verdict = "meets" if point.ok else "misses"
    print(f"\n== {point.rate:.2f} req/s: {verdict} the SLO ==\n{point.report.table()}")


async def _loadtest_async(args: argparse.Namespace) -> int:
    check_target(args.url, args.allow_remote)
    async with AsyncLoraplexClient(
        args.url, api_key=args.api_key, timeout=args.timeout, max_connections=args.concurrency
    ) as client:
        base, names = await _resolve_names(client, args)
        popularity = PopularitySpec(
            tuple(names), args.popularity, args.zipf_alpha, args.base_fraction if names else 1.0
        )
        spec = WorkloadSpec(
            ArrivalSpec(args.rate, args.arrival, args.cv),
            popularity,
            args.input_len,
            args.output_len,
            args.num_requests,
            args.duration,
            args.seed,
        )
        config = RunConfig(
            base, args.concurrency, args.drain_timeout, args.temperature, not args.no_ignore_eos
        )
        prompts = PromptFactory.from_tokenizer_dir(args.tokenizer, args.seed, args.prompt_source)
        progress = not args.no_progress
        if args.sweep or args.sweep_search:
            search = SweepSearch(
                rates=args.sweep, start_rate=args.rate, max_rate=args.max_rate, on_point=_print_point
            )
            result, runs = await run_sweep(
                client, spec, config, args.slo_ttft_p99, prompts=prompts, progress=progress, **search
            )
            print(
                f"\nsustainable under p99 TTFT <= {args.slo_ttft_p99 * 1000:.0f} ms: "
                f"{result.sustainable_rate:.2f} req/s offered, {result.sustainable_throughput:.2f} req/s and "
                f"{result.sustainable_token_throughput:.1f} tok/s achieved"
            )
            if args.json:
                args.json.write_text(
                    json.dumps({"workload": spec.to_dict(), "sweep": result.to_dict()}, indent=2)
                )
            if args.plot_dir:
                from clients.loadgen.plots import plot_latency_cdf, plot_sweep

                plot_sweep({"server": result}, args.plot_dir / "sweep.png")
                plot_latency_cdf({f"{r:.2f} req/s": run.records for r, run in sorted(runs.items())},
                                 args.plot_dir / "latency_cdf.png")  # fmt: skip
            return 0
        run = await run_load(
            client, spec, config, prompts, progress=progress, metrics_interval_s=args.metrics_interval or None
        )
        print(run.report.table())
        if args.json:
            args.json.write_text(json.dumps(run.to_dict(), indent=2))
        if args.plot_dir:
            from clients.loadgen.plots import plot_adapter_timeline, plot_latency_cdf

            plot_latency_cdf({"server": run.records}, args.plot_dir / "latency_cdf.png")
            if run.adapter_timeline:
                plot_adapter_timeline(
                    {"server": run.adapter_timeline}, args.plot_dir / "adapter_timeline.png"
                )
        return 0 if run.report.error_count == 0 else 2


def _loadtest(args: argparse.Namespace) -> int:
    return asyncio.run(_loadtest_async(args))
