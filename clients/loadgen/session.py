"""One load run or one sweep, end to end: schedule -> send -> summarize.

The CLI and ``scripts/compare_baseline.py`` both go through here, so a number in the comparison table
means exactly what ``loraplex loadtest`` prints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from clients.client import AsyncLoraplexClient
from clients.loadgen.progress import Progress
from clients.loadgen.prompts import PromptFactory
from clients.loadgen.record import RequestRecord
from clients.loadgen.report import Report, summarize
from clients.loadgen.runner import RunConfig, run_schedule
from clients.loadgen.sweep import SweepResult, SweepSearch, sweep
from clients.loadgen.workload import WorkloadSpec, generate_schedule

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.11 on


@dataclass
class LoadResult:
    spec: WorkloadSpec
    records: list[RequestRecord]
    duration_s: float
    report: Report

    def to_dict(self) -> dict:
        return {"workload": self.spec.to_dict(), "report": self.report.to_dict()}


async def run_load(
    client: AsyncLoraplexClient,
    spec: WorkloadSpec,
    config: RunConfig,
    prompts: PromptFactory | None = None,
    *,
    progress: bool = True,
    desc: str = "load",
) -> LoadResult:
    """Run the workload once against ``client`` and summarize it."""
    schedule = generate_schedule(spec)
    prompts = prompts or PromptFactory(spec.seed)
    bar = Progress(len(schedule), enabled=progress, desc=desc)
    try:
        records, duration = await run_schedule(client, schedule, prompts, config, on_done=bar.update)
    finally:
        bar.close()
    return LoadResult(spec, records, duration, summarize(records, duration, spec.arrival.rate))


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
