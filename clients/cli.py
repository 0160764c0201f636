"""Command line for the client side: ``adapters ...``, ``complete ...``, ``loadtest ...``.

Usable standalone (``python -m clients ...``) or mounted into the server's ``loraplex`` command with
:func:`register`, which adds the three subcommands to an argparse subparsers object; each parsed
namespace carries ``func(args) -> int`` (the exit code).

Connection options come from flags or ``LORAPLEX_URL`` / ``LORAPLEX_API_KEY`` / ``LORAPLEX_ADMIN_KEY``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from clients.client import DEFAULT_BASE_URL, AsyncLoraplexClient, LoraplexClient
from clients.errors import LoraplexError
from clients.loadgen import (
    ArrivalSpec,
    LengthSpec,
    PopularitySpec,
    RunConfig,
    TargetNotAllowed,
    WorkloadSpec,
    check_target,
    run_load,
    run_sweep,
)
from clients.loadgen.prompts import PromptFactory
from clients.loadgen.workload import MAX_ADAPTERS, MAX_DURATION_S, MAX_REQUESTS


def _connection_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--url", default=os.environ.get("LORAPLEX_URL", DEFAULT_BASE_URL), help="server base URL"
    )
    parent.add_argument("--api-key", default=os.environ.get("LORAPLEX_API_KEY"), help="bearer key")
    parent.add_argument(
        "--admin-key", default=os.environ.get("LORAPLEX_ADMIN_KEY"), help="key for adapter changes"
    )
    parent.add_argument("--timeout", type=float, default=120.0, help="per-request timeout in seconds")
    return parent


def _client(args: argparse.Namespace) -> LoraplexClient:
    return LoraplexClient(args.url, api_key=args.api_key, admin_key=args.admin_key, timeout=args.timeout)


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


# --- adapters ---------------------------------------------------------------------------------
def _adapters(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.action == "upload":
            info = client.upload_adapter(args.dir, args.name)
            print(f"uploaded {info.name}" + (f" (rank {info.rank})" if info.rank else ""))
        elif args.action == "ls":
            adapters = client.list_adapters()
            if args.json:
                _print_json([a.raw for a in adapters])
            else:
                for a in adapters:
                    extra = " ".join(
                        f"{k}={v}"
                        for k, v in (("rank", a.rank), ("source", a.source), ("resident", a.resident))
                        if v is not None
                    )
                    print(f"{a.name}\t{extra}".rstrip())
        elif args.action == "get":
            _print_json(client.get_adapter(args.name).raw)
        elif args.action == "rm":
            client.delete_adapter(args.name)
            print(f"deleted {args.name}")
        elif args.action == "merge":
            result = client.merge_adapter(args.name)
            print(result.path or json.dumps(result.raw))
        elif args.action == "load":
            client.load_lora_adapter(args.name, args.path)
            print(f"loaded {args.name} from {args.path}")
        elif args.action == "unload":
            client.unload_lora_adapter(args.name)
            print(f"unloaded {args.name}")
    return 0


def _add_adapters(subparsers, parent: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser("adapters", help="manage adapters on a running server")
    actions = p.add_subparsers(dest="action", required=True)
    up = actions.add_parser("upload", parents=[parent], help="upload a PEFT adapter directory")
    up.add_argument("dir", type=Path)
    up.add_argument("--name", required=True)
    ls = actions.add_parser("ls", parents=[parent], help="list adapters")
    ls.add_argument("--json", action="store_true")
    for action, text in (
        ("get", "show one adapter"),
        ("rm", "delete an adapter"),
        ("unload", "vLLM-style unload"),
    ):
        actions.add_parser(action, parents=[parent], help=text).add_argument("name")
    merge = actions.add_parser("merge", parents=[parent], help="export the adapter merged into the base")
    merge.add_argument("name")
    load = actions.add_parser("load", parents=[parent], help="vLLM-style load from a server-side path")
    load.add_argument("name")
    load.add_argument("path")
    p.set_defaults(func=_adapters)


# --- complete ---------------------------------------------------------------------------------
def _complete(args: argparse.Namespace) -> int:
    model = args.adapter or args.model
    sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature, "seed": args.seed}
    with _client(args) as client:
        if args.chat:
            messages = [{"role": "user", "content": args.prompt}]
            if args.no_stream:
                print(client.chat(messages, model, **sampling).text)
                return 0
            stream = client.stream_chat(messages, model, **sampling)
        else:
            if args.no_stream:
                print(client.complete(args.prompt, model, **sampling).text)
                return 0
            stream = client.stream_complete(args.prompt, model, **sampling)
        usage = None
        for chunk in stream:
            if chunk.text:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
            usage = chunk.usage or usage
        sys.stdout.write("\n")
        if usage is not None and args.usage:
            print(
                f"[{usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens]",
                file=sys.stderr,
            )
    return 0


def _add_complete(subparsers, parent: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser("complete", parents=[parent], help="generate text (streams to stdout)")
    p.add_argument("prompt")
    p.add_argument("--adapter", help="adapter name (default: the base model)")
    p.add_argument("--model", help="served model name (default: the server's base model)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--chat", action="store_true", help="use /v1/chat/completions with one user message")
    p.add_argument("--no-stream", action="store_true")
    p.add_argument("--usage", action="store_true", help="print token usage to stderr")
    p.set_defaults(func=_complete)


# --- loadtest ---------------------------------------------------------------------------------
def _rates(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _add_loadtest(subparsers, parent: argparse.ArgumentParser) -> None:
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
            result, runs = await run_sweep(
                client,
                spec,
                config,
                args.slo_ttft_p99,
                rates=args.sweep,
                start_rate=args.rate,
                max_rate=args.max_rate,
                prompts=prompts,
                progress=progress,
                on_point=lambda pt: print(
                    f"\n== {pt.rate:.2f} req/s: {'meets' if pt.ok else 'misses'} the SLO ==\n{pt.report.table()}"
                ),
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
        run = await run_load(client, spec, config, prompts, progress=progress)
        print(run.report.table())
        if args.json:
            args.json.write_text(json.dumps(run.to_dict(), indent=2))
        if args.plot_dir:
            from clients.loadgen.plots import plot_latency_cdf

            plot_latency_cdf({"server": run.records}, args.plot_dir / "latency_cdf.png")
        return 0 if run.report.error_count == 0 else 2


def _loadtest(args: argparse.Namespace) -> int:
    return asyncio.run(_loadtest_async(args))


# --- entry points -----------------------------------------------------------------------------
def register(subparsers) -> None:
    """Add ``adapters``, ``complete`` and ``loadtest`` to an argparse ``add_subparsers()`` object."""
    parent = _connection_parent()
    _add_adapters(subparsers, parent)
    _add_complete(subparsers, parent)
    _add_loadtest(subparsers, parent)


def run(args: argparse.Namespace) -> int:
    """Dispatch a namespace parsed with :func:`register`'s parsers, mapping client errors to exit 1."""
    try:
        return args.func(args)
    except (LoraplexError, TargetNotAllowed, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clients", description="loraplex client tools")
    register(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(argv))
