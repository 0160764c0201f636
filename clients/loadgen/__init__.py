"""Open-loop multi-adapter load generator (S-LoRA / Punica style workloads)."""

from clients.loadgen.record import RequestRecord
from clients.loadgen.report import Report, summarize
from clients.loadgen.runner import RunConfig, run_schedule
from clients.loadgen.session import LoadResult, run_load, run_sweep
from clients.loadgen.sweep import SweepResult, meets_slo, sweep
from clients.loadgen.target import TargetNotAllowed, check_target
from clients.loadgen.workload import (
    ArrivalSpec,
    LengthSpec,
    PlannedRequest,
    PopularitySpec,
    WorkloadSpec,
    generate_schedule,
)

__all__ = [
    "ArrivalSpec",
    "LengthSpec",
    "LoadResult",
    "PlannedRequest",
    "PopularitySpec",
    "Report",
    "RequestRecord",
    "RunConfig",
    "SweepResult",
    "TargetNotAllowed",
    "WorkloadSpec",
    "check_target",
    "generate_schedule",
    "meets_slo",
    "run_load",
    "run_schedule",
    "run_sweep",
    "summarize",
    "sweep",
]
