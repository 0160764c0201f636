"""Find the highest offered rate a server sustains under a p99 TTFT SLO.

"Sustains" means: p99 TTFT <= SLO and the error rate within ``max_error_rate`` (default: no errors), so
shedding load with 429s does not count as keeping up. Either a given list of rates is run in order, or
the search grows the rate geometrically until the SLO breaks and then bisects between the last good and
the first bad rate. The run itself is injected, which keeps this logic testable without a server.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypedDict

from clients.loadgen.report import Report


def meets_slo(report: Report, slo_ttft_p99_s: float, max_error_rate: float = 0.0) -> bool:
    if report.requests == 0 or report.ok == 0:
        return False
    p99 = report.ttft.p99
    return (
        not math.isnan(p99)
        and p99 <= slo_ttft_p99_s
        and report.error_count / report.requests <= max_error_rate
    )


@dataclass
class SweepPoint:
    rate: float
    report: Report
    ok: bool


@dataclass
class SweepResult:
    slo_ttft_p99_s: float
    points: list[SweepPoint] = field(default_factory=list)

    @property
    def best(self) -> SweepPoint | None:
        """The highest rate that met the SLO (None when even the lowest tried rate failed)."""
        good = [p for p in self.points if p.ok]
        return max(good, key=lambda p: p.rate) if good else None

    @property
    def sustainable_rate(self) -> float:
        return self.best.rate if self.best else 0.0

    @property
    def sustainable_throughput(self) -> float:
        """Achieved req/s at the best rate."""
        return self.best.report.request_throughput if self.best else 0.0

    @property
    def sustainable_token_throughput(self) -> float:
        return self.best.report.output_token_throughput if self.best else 0.0

    def to_dict(self) -> dict:
        return {
            "slo_ttft_p99_s": self.slo_ttft_p99_s,
            "sustainable_rate": self.sustainable_rate,
            "sustainable_throughput": self.sustainable_throughput,
            "sustainable_token_throughput": self.sustainable_token_throughput,
            "points": [
                {"rate": p.rate, "meets_slo": p.ok, "report": p.report.to_dict()} for p in self.points
            ],
        }


RunAt = Callable[[float], Awaitable[Report]]


class SweepSearch(TypedDict, total=False):
    """The keyword options of :func:`sweep` (which rates to try, what counts as sustained), as one value
    that callers pass along: fixed ``rates``, or a search from ``start_rate`` up to ``max_rate``."""

    rates: list[float] | None
    start_rate: float
    max_rate: float
    growth: float
    refine_steps: int
    max_error_rate: float
    on_point: Callable[[SweepPoint], None] | None


async def sweep(
    run_at: RunAt,
    slo_ttft_p99_s: float,
    *,
    rates: list[float] | None = None,
    start_rate: float = 1.0,
    max_rate: float = 1000.0,
    growth: float = 2.0,
    refine_steps: int = 3,
    max_error_rate: float = 0.0,
    on_point: Callable[[SweepPoint], None] | None = None,
) -> SweepResult:
    """Run ``run_at(rate)`` at the listed rates, or search; see the module docstring."""
    if slo_ttft_p99_s <= 0:
        raise ValueError("SLO must be > 0")
    result = SweepResult(slo_ttft_p99_s)

    async def probe(rate: float) -> bool:
        report = await run_at(rate)
        point = SweepPoint(rate, report, meets_slo(report, slo_ttft_p99_s, max_error_rate))
        result.points.append(point)
        if on_point is not None:
            on_point(point)
        return point.ok

    if rates:
        failures = 0
        for rate in sorted(rates):
            failures = 0 if await probe(rate) else failures + 1
            if failures == 2:  # past saturation; more points only cost time
                break
        return result

    if not (start_rate > 0 and growth > 1):
        raise ValueError("search needs start_rate > 0 and growth > 1")
    good, bad = 0.0, None
    rate = start_rate
    while rate <= max_rate:
        if await probe(rate):
            good = rate
            rate *= growth
        else:
            bad = rate
            break
    if bad is None:
        return result  # never broke the SLO up to max_rate
    lo = good if good > 0 else bad / growth
    for _ in range(refine_steps):
        mid = (lo + bad) / 2.0
        if await probe(mid):
            lo = mid
        else:
            bad = mid
    return result
