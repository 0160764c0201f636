"""Prefix caching on vs off, in one run: ``python -m benchmarks.prefix_bench [--quick] [--repeats N]``.

Shared prefixes: 8 adapters, each with its own system prompt (1,024 tokens), 64 requests (round-robin
over the adapters) each ending in a short distinct user turn, all queued at once; TTFT p50 and output
throughput with caching off and on. With caching on the burst runs twice: "cold", where the burst
itself brings each tenant's system prompt for the first time (its first request per adapter computes
it), then "warm", a second burst of new user turns on the same system prompts - the steady state of
tenants whose system prompt does not change. Nothing shared: distinct prompts, where caching can only
cost (hashing, lookups), so the throughputs should match. Each repeat draws fresh system prompts
(nothing carries over between repeats); the engines alternate and the table shows medians.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.adapters import write_random_adapters
from benchmarks.engine_bench import build_bench_runtime
from benchmarks.workload import Target, make_bench_model
from server.bootstrap import Runtime
from server.engine.sequence import Sequence
from server.engine.types import SamplingParams

VOCAB = 32000
OFF, ON, COLD, WARM = "caching off", "caching on", "caching on, cold", "caching on, warm"


@dataclass(frozen=True)
class Shape:
    adapters: int = 8
    system_len: int = 1024
    requests: int = 64
    user_len: tuple[int, int] = (12, 32)
    new_tokens: int = 32
    distinct_requests: int = 32
    distinct_len: int = 512


QUICK = Shape(adapters=2, system_len=256, requests=16, new_tokens=8, distinct_requests=8, distinct_len=64)


@dataclass
class BurstResult:
    ttft_p50: float
    ttft_p90: float
    output_tps: float
    seconds: float
    cpu_tps: float  # output tokens per CPU-second of this process: less moved by other load than wall time
    bookkeeping_s: float  # time in the prefix cache's own work (hash chains, lookups, publishing)
    cached_fraction: float  # of all prompt tokens


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, VOCAB) for _ in range(n)]


def shared_requests(
    shape: Shape, names: list[str], seed: object, turns: object = 0
) -> list[tuple[str, list[int]]]:
    """Round-robin over ``names``, each adapter's own system prompt (drawn from ``seed``) + a user turn."""
    systems_rng = random.Random(f"shared:{seed}")
    systems = [_tokens(systems_rng, shape.system_len) for _ in names]
    rng = random.Random(f"turns:{seed}:{turns}")
    return [
        (names[i % len(names)], systems[i % len(names)] + _tokens(rng, rng.randint(*shape.user_len)))
        for i in range(shape.requests)
    ]


def distinct_requests(shape: Shape, names: list[str], seed: object) -> list[tuple[str, list[int]]]:
    rng = random.Random(f"distinct:{seed}")
    return [(names[i % len(names)], _tokens(rng, shape.distinct_len)) for i in range(shape.distinct_requests)]


@contextmanager
def timed_methods(obj, names: tuple[str, ...], total: list[float]):
    """Adds the time spent in ``obj``'s methods ``names`` to ``total[0]`` while in the block."""

    def wrap(method):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                total[0] += time.perf_counter() - start

        return timed

    for name in names:
        setattr(obj, name, wrap(getattr(obj, name)))
    try:
        yield
    finally:
        for name in names:
            delattr(obj, name)  # the class's methods again


def run_burst(rt: Runtime, requests, new_tokens: int, target: Target) -> BurstResult:
    """Queues every request at once and steps the engine to the end; TTFT counts from the queueing."""
    core = rt.engine.core
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    seqs = [Sequence(f"b{i}", p, params, rt.adapters.resolve(name)) for i, (name, p) in enumerate(requests)]
    bookkeeping = [0.0]
    target.sync()
    start, cpu_start = time.perf_counter(), time.process_time()
    for seq in seqs:
        core.add(seq)
    first: dict[str, float] = {}
    produced = 0
    with timed_methods(core.block_manager, ("cached_prefix", "publish"), bookkeeping):
        while core.has_work():
            for _, out in core.step():
                if out.new_token_ids:
                    produced += len(out.new_token_ids)
                    first.setdefault(out.request_id, time.perf_counter() - start)
    target.sync()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    assert produced == len(requests) * new_tokens, produced
    ttfts = sorted(first.values())
    cached = sum(s.num_cached_tokens or 0 for s in seqs) / sum(s.num_prompt_tokens for s in seqs)
    return BurstResult(statistics.median(ttfts), ttfts[int(0.9 * (len(ttfts) - 1))], produced / seconds,
                       seconds, produced / cpu_seconds, bookkeeping[0], cached)  # fmt: skip


def engines(
    model_dir: Path, store: Path, names: list[str], shape: Shape, target: Target
) -> dict[str, Runtime]:
    """The same engine twice, caching on and off, every adapter already in a device slot, warmed up
    on a burst of the benchmark's own shapes (first calls of long prefills are slow)."""
    warmup = shared_requests(shape, names, seed="warm-up")[:2]
    longest = max(shape.system_len + shape.user_len[1], shape.distinct_len) + shape.new_tokens
    blocks = max(shape.requests, shape.distinct_requests) * (longest // 16 + 2)  # room for every request
    out = {}
    for label, caching in ((OFF, False), (ON, True)):
        rt = build_bench_runtime(model_dir, target, adapter_store=store, max_loras=len(names),
                                 prefix_caching=caching, num_kv_blocks=blocks)  # fmt: skip
        rt.lora.manager.activate(set(names))
        run_burst(rt, warmup, 2, target)
        out[label] = rt
    return out


def _median(results: list[BurstResult], field: str) -> float:
    return statistics.median(getattr(r, field) for r in results)


def _row(label: str, results: list[BurstResult]) -> str:
    return (
        f"{label:<18} {_median(results, 'ttft_p50'):>11.3f} {_median(results, 'ttft_p90'):>11.3f} "
        f"{_median(results, 'output_tps'):>13.1f} {_median(results, 'seconds'):>8.2f} "
        f"{_median(results, 'cached_fraction'):>7.1%}"
    )


def _ratios(a: list[BurstResult], b: list[BurstResult], of) -> str:
    values = [of(x, y) for x, y in zip(a, b, strict=True)]
    return f"{statistics.median(values):.2f} (per repeat {', '.join(f'{v:.2f}' for v in values)})"


def report(
    shared: dict[str, list[BurstResult]], distinct: dict[str, list[BurstResult]], shape: Shape
) -> None:
    if shared[OFF]:
        print(
            f"\nShared prefixes: {shape.adapters} adapters x own {shape.system_len}-token system prompt, "
            f"{shape.requests} requests (user turn {shape.user_len[0]}-{shape.user_len[1]} tokens, "
            f"{shape.new_tokens} new), all queued at once; medians of {len(shared[OFF])} repeats"
        )
        print(
            f"{'engine':<18} {'TTFT p50 s':>11} {'TTFT p90 s':>11} {'output tok/s':>13} {'wall s':>8} {'cached':>7}"
        )
        for label, results in shared.items():
            print(_row(label, results))
        for label in (COLD, WARM):
            ttft = _ratios(shared[OFF], shared[label], lambda a, b: a.ttft_p50 / b.ttft_p50)
            tps = _ratios(shared[OFF], shared[label], lambda a, b: b.output_tps / a.output_tps)
            print(f"{label}: TTFT p50 off/on = {ttft}; throughput on/off = {tps}")
        print("(target: TTFT p50 >= 5x lower with caching on)")
    if distinct[OFF]:
        print(f"\nNothing shared: {shape.distinct_requests} distinct {shape.distinct_len}-token prompts")
        for label, results in distinct.items():
            print(
                f"{label:<18} output tok/s {_median(results, 'output_tps'):>8.1f}  wall {_median(results, 'seconds'):.2f} s"
            )
        ratio = _ratios(distinct[OFF], distinct[ON], lambda a, b: b.output_tps / a.output_tps)
        print(f"throughput on/off = {ratio} (target: within 3%)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny model and workload: a smoke run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parts", nargs="+", choices=["shared", "distinct"], default=["shared", "distinct"])
    parser.add_argument(
        "--distinct-requests", type=int, default=None, help="override the distinct-prompt count"
    )
    parser.add_argument("--distinct-len", type=int, default=None, help="override the distinct-prompt length")
    parser.add_argument("--model-dir", type=Path, default=None, help="reuse a built benchmark model")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    args = parser.parse_args()
    target = Target.parse(args.device, args.dtype)
    shape = QUICK if args.quick else Shape()
    shape = dataclasses.replace(
        shape,
        distinct_requests=args.distinct_requests or shape.distinct_requests,
        distinct_len=args.distinct_len or shape.distinct_len,
    )
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {target.device}, {target.dtype}")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_bench_model(
            args.model_dir or Path(tmp) / "bench-llama", "bench-quick" if args.quick else "bench"
        )
        names = write_random_adapters(model_dir, Path(tmp) / "store", shape.adapters, ranks=(16,))
        rts = engines(model_dir, Path(tmp) / "store", names, shape, target)
        shared: dict[str, list[BurstResult]] = {OFF: [], COLD: [], WARM: []}
        distinct: dict[str, list[BurstResult]] = {OFF: [], ON: []}

        def measure(results: list[BurstResult], label: str, rt: Runtime, requests) -> None:
            results.append(run_burst(rt, requests, shape.new_tokens, target))
            r = results[-1]
            print(f"  {label}: TTFT p50 {r.ttft_p50:.3f} s, {r.output_tps:.1f} tok/s ({r.cpu_tps:.1f} per CPU-s), "
                  f"{r.seconds:.1f} s, cached {r.cached_fraction:.1%}, bookkeeping {r.bookkeeping_s * 1000:.1f} ms",
                  flush=True)  # fmt: skip

        for repeat in range(args.repeats):
            for label, rt in rts.items():
                if "shared" in args.parts:
                    measure(shared[OFF if label == OFF else COLD], f"{repeat} shared {label}", rt,
                            shared_requests(shape, names, repeat))  # fmt: skip
                if "shared" in args.parts and label == ON:  # the same system prompts, new user turns
                    measure(
                        shared[WARM], f"{repeat} shared {WARM}", rt, shared_requests(shape, names, repeat, 1)
                    )
                if "distinct" in args.parts:
                    measure(
                        distinct[label],
                        f"{repeat} distinct {label}",
                        rt,
                        distinct_requests(shape, names, repeat),
                    )
        report(shared, distinct, shape)


if __name__ == "__main__":
    main()
