"""Summary of a load run: throughput, latency percentiles, errors by kind, per-adapter breakdown.

Pure functions of the records, so the numbers printed, written as JSON and plotted are one computation.
Throughput counts successful requests over the wall time of the run (first arrival slot to last
completion), the S-LoRA definition; latency percentiles are over successful requests only, and errors
are reported next to them so a fast-failing server cannot look good.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field

from clients.loadgen.record import RequestRecord

BASE_LABEL = "<base>"


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]; NaN for no values."""
    if not values:
        return math.nan
    data = sorted(values)
    pos = (len(data) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


@dataclass
class LatencyStats:
    count: int
    mean: float
    p50: float
    p90: float
    p99: float
    max: float

    @classmethod
    def of(cls, values: list[float]) -> LatencyStats:
        if not values:
            return cls(0, math.nan, math.nan, math.nan, math.nan, math.nan)
        return cls(
            len(values),
            sum(values) / len(values),
            percentile(values, 50),
            percentile(values, 90),
            percentile(values, 99),
            max(values),
        )


@dataclass
class AdapterStats:
    adapter: str
    requests: int
    ok: int
    errors: int
    output_tokens: int
    ttft: LatencyStats
    e2e: LatencyStats


@dataclass
class Report:
    requests: int
    ok: int
    errors: dict[str, int]
    duration_s: float
    request_throughput: float  # successful req/s
    output_token_throughput: float  # output tok/s of successful requests
    ttft: LatencyStats
    e2e: LatencyStats
    itl: LatencyStats
    offered_rate: float | None = None
    per_adapter: list[AdapterStats] = field(default_factory=list)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def to_dict(self) -> dict:
        """JSON-ready (NaN becomes null)."""
        return _nan_to_none(asdict(self))

    def table(self, top_adapters: int = 10) -> str:
        return format_report(self, top_adapters)


def _nan_to_none(obj):
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_none(v) for v in obj]
    return obj


def summarize(records: list[RequestRecord], duration_s: float, offered_rate: float | None = None) -> Report:
    ok = [r for r in records if r.ok]
    errors = Counter(r.error_kind for r in records if r.error_kind is not None)
    duration = max(duration_s, 1e-9)
    groups: dict[str, list[RequestRecord]] = defaultdict(list)
    for r in records:
        groups[r.adapter or BASE_LABEL].append(r)
    per_adapter = []
    for name, recs in groups.items():
        good = [r for r in recs if r.ok]
        per_adapter.append(
            AdapterStats(
                adapter=name,
                requests=len(recs),
                ok=len(good),
                errors=len(recs) - len(good),
                output_tokens=sum(r.output_tokens for r in good),
                ttft=LatencyStats.of([r.ttft for r in good if r.ttft is not None]),
                e2e=LatencyStats.of([r.e2e for r in good if r.e2e is not None]),
            )
        )
    per_adapter.sort(key=lambda a: (-a.requests, a.adapter))
    return Report(
        requests=len(records),
        ok=len(ok),
        errors=dict(sorted(errors.items())),
        duration_s=duration_s,
        request_throughput=len(ok) / duration,
        output_token_throughput=sum(r.output_tokens for r in ok) / duration,
        ttft=LatencyStats.of([r.ttft for r in ok if r.ttft is not None]),
        e2e=LatencyStats.of([r.e2e for r in ok if r.e2e is not None]),
        itl=LatencyStats.of([gap for r in ok for gap in r.inter_token]),
        offered_rate=offered_rate,
        per_adapter=per_adapter,
    )


def _ms(x: float) -> str:
    return "-" if math.isnan(x) else f"{x * 1000:.1f}"


def format_grid(header: list[str], rows: list[list[str]]) -> str:
    """Aligned plain-text table: first column left, the rest right-aligned."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    line = "  ".join(
        h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths, strict=True))
    )
    out = [line, "-" * len(line)]
    for row in rows:
        out.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    return "\n".join(out)


def format_report(report: Report, top_adapters: int = 10) -> str:
    """Terminal tables: totals, latency percentiles (ms), errors, and the busiest adapters."""
    offered = f"{report.offered_rate:.2f} req/s offered, " if report.offered_rate else ""
    lines = [
        f"{report.requests} requests ({offered}{report.duration_s:.1f} s): {report.ok} ok, "
        f"{report.error_count} errors",
        f"throughput: {report.request_throughput:.2f} req/s, {report.output_token_throughput:.1f} output tok/s",
        "",
        format_grid(
            ["latency (ms)", "mean", "p50", "p90", "p99", "max"],
            [
                [name, _ms(s.mean), _ms(s.p50), _ms(s.p90), _ms(s.p99), _ms(s.max)]
                for name, s in (
                    ("TTFT", report.ttft),
                    ("end-to-end", report.e2e),
                    ("inter-token", report.itl),
                )
            ],
        ),
    ]
    if report.errors:
        lines += ["", format_grid(["error", "count"], [[k, str(v)] for k, v in report.errors.items()])]
    shown = report.per_adapter[:top_adapters]
    if shown:
        rows = [
            [a.adapter, str(a.requests), str(a.errors), str(a.output_tokens), _ms(a.ttft.p50), _ms(a.ttft.p99),
             _ms(a.e2e.p50), _ms(a.e2e.p99)]
            for a in shown
        ]  # fmt: skip
        rest = len(report.per_adapter) - len(shown)
        title = f"per adapter (top {len(shown)} of {len(report.per_adapter)}" + (
            f", {rest} more in JSON)" if rest else ")"
        )
        lines += [
            "",
            title,
            format_grid(
                ["adapter", "reqs", "errors", "out tok", "TTFT p50", "TTFT p99", "e2e p50", "e2e p99"], rows
            ),
        ]
    return "\n".join(lines)
