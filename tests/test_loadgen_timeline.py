"""The adapter timeline: counters parsed from /metrics text, rates between samples, the sampler, the plot."""

from __future__ import annotations

import asyncio
import math

from clients.loadgen.plots import plot_adapter_timeline
from clients.loadgen.timeline import MetricsSampler, parse_counters, timeline

EXPOSITION = """# HELP loraplex_adapter_loads_total Adapters parsed from disk into host memory.
# TYPE loraplex_adapter_loads_total counter
loraplex_adapter_loads_total 12.0
loraplex_adapter_loads_created 1.7e9
loraplex_adapter_activations_total 30.0
loraplex_adapter_slot_hits_total 8.0
loraplex_adapter_slot_misses_total 2.0
loraplex_adapter_requests_total{adapter="a"} 5.0
vllm:num_requests_running 3.0
"""


def _counters(loads, activations, hits, misses, evictions=0.0):
    return {"loads": loads, "activations": activations, "slot_hits": hits, "slot_misses": misses,
            "evictions": evictions}  # fmt: skip


def test_parse_counters_reads_only_the_unlabelled_residency_counters():
    assert parse_counters(EXPOSITION) == {
        "loads": 12.0,
        "activations": 30.0,
        "slot_hits": 8.0,
        "slot_misses": 2.0,
    }
    assert parse_counters("vllm:num_requests_running 3\n") == {}


def test_timeline_rates_and_hit_rate_between_samples():
    samples = [(0.0, _counters(0, 0, 0, 0)), (2.0, _counters(4, 6, 3, 1, 2)), (3.0, _counters(4, 6, 3, 1, 2))]
    first, idle = timeline(samples)
    assert (first.start, first.end, first.mid) == (0.0, 2.0, 1.0)
    assert (first.loads_per_s, first.activations_per_s, first.evictions_per_s) == (2.0, 3.0, 1.0)
    assert first.slot_hit_rate == 0.75
    assert idle.loads_per_s == 0.0 and math.isnan(idle.slot_hit_rate)  # nothing scheduled: no rate


def test_sampler_collects_until_stopped_and_the_plot_is_written(tmp_path):
    calls = []

    async def fetch() -> str:
        calls.append(1)
        if len(calls) == 2:
            raise ConnectionError("a missed scrape is a gap, not a failure")
        n = len(calls)
        return (
            f"loraplex_adapter_loads_total {n}\nloraplex_adapter_slot_hits_total {2 * n}\n"
            f"loraplex_engine_steps_total {4 * n}\nloraplex_scheduled_sequences_total {12 * n}\n"
        )

    async def go():
        sampler = MetricsSampler(fetch, interval_s=0.01)
        sampler.start()
        await asyncio.sleep(0.08)
        return sampler, await sampler.stop()

    sampler, points = asyncio.run(go())
    assert len(sampler.samples) >= 3 and len(points) == len(sampler.samples) - 1
    assert all(p.loads_per_s > 0 and p.slot_hit_rate == 1.0 and p.mean_batch == 3.0 for p in points)
    path = plot_adapter_timeline({"1000 adapters": points, "8 adapters": points[:2]}, tmp_path / "t.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
