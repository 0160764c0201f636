"""One load run or one sweep, end to end: schedule -> send -> summarize.

The CLI and ``scripts/compare_baseline.py`` both go through here, so a number in the comparison table
means exactly what ``loraplex loadtest`` prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from clients.client import AsyncLoraplexClient
from clients.loadgen.progress import Progress
from clients.loadgen.prompts import PromptFactory
from clients.loadgen.record import RequestRecord
from clients.loadgen.report import Report, summarize
from clients.loadgen.runner import RunConfig, run_schedule
from clients.loadgen.sweep import SweepResult, SweepSearch, sweep
from clients.loadgen.timeline import MetricsSampler, TimelinePoint, timeline_dicts
from clients.loadgen.workload import WorkloadSpec, generate_schedule

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.11 on


@dataclass
class LoadResult:
    spec: WorkloadSpec
    records: list[RequestRecord]
    duration_s: float
    report: Report
    adapter_timeline: list[TimelinePoint] = field(default_factory=list)  # when /metrics was sampled

    def to_dict(self) -> dict:
        out = {"workload": self.spec.to_dict(), "report": self.report.to_dict()}
        if self.adapter_timeline:
            out["adapter_timeline"] = timeline_dicts(self.adapter_timeline)
        return out


async def run_load(
    client: AsyncLoraplexClient,
    spec: WorkloadSpec,
    config: RunConfig,
    prompts: PromptFactory | None = None,
    *,
    progress: bool = True,
    desc: str = "load",
    metrics_interval_s: float | None = None,
) -> LoadResult:
    """Run the workload once against ``client`` and summarize it; with ``metrics_interval_s``, the
    server's /metrics is sampled that often for the adapter timeline."""
    schedule = generate_schedule(spec)
    prompts = prompts or PromptFactory(spec.seed)
    bar = Progress(len(schedule), enabled=progress, desc=desc)
    sampler = MetricsSampler(client.metrics, metrics_interval_s) if metrics_interval_s else None
    if sampler is not None:
        sampler.start()
    try:
        records, duration = await run_schedule(client, schedule, prompts, config, on_done=bar.update)
    finally:
        bar.close()
        points = await sampler.stop() if sampler is not None else []
    report = summarize(records, duration, spec.arrival.rate)
    return LoadResult(spec, records, duration, report, points)


async def run_sweep(
    client: AsyncLoraplexClient,
    spec: WorkloadSpec,
    config: RunConfig,
    slo_ttft_p99_s: float,
    *,
    prompts: PromptFactory | None = None,
    progress: bool = True,
    **search: Unpack[SweepSearch],
) -> tuple[SweepResult, dict[float, LoadResult]]:
    """Sweep offered load with :func:`clients.loadgen.sweep.sweep`, given its keywords as ``search``
    (``rates``, or ``start_rate``/``max_rate``, ``on_point``, ...); also returns every run by rate."""
    runs: dict[float, LoadResult] = {}

    async def run_at(rate: float) -> Report:
        result = await run_load(
            client, spec.with_rate(rate), config, prompts, progress=progress, desc=f"{rate:.2f} req/s"
        )
        runs[rate] = result
        return result.report

    return await sweep(run_at, slo_ttft_p99_s, **search), runs
