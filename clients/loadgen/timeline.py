"""The server's adapter residency over a load run, sampled from its ``/metrics`` counters.

While the requests go out, a sampler reads the server's lifetime counters every ``interval_s``
(adapter loads from disk, slot copies, evictions, slot hits and misses, engine steps and scheduled
sequences). Differences between samples give the timeline: adapter loads per second, the slot hit
rate (of the requests scheduled in the interval, the fraction whose adapter was already in a device
slot) and the mean batch (sequences per step). A server without these counters
(another implementation) gives an empty timeline, not an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass

COUNTERS = {  # short name -> Prometheus sample name
    "loads": "loraplex_adapter_loads_total",
    "activations": "loraplex_adapter_activations_total",
    "evictions": "loraplex_adapter_evictions_total",
    "prefetch_fills": "loraplex_adapter_prefetch_fills_total",
    "slot_hits": "loraplex_adapter_slot_hits_total",
    "slot_misses": "loraplex_adapter_slot_misses_total",
    "steps": "loraplex_engine_steps_total",
    "scheduled": "loraplex_scheduled_sequences_total",
}


def parse_counters(text: str) -> dict[str, float]:
    """The unlabelled ``COUNTERS`` samples of a Prometheus text exposition, by short name."""
    wanted = {sample: short for short, sample in COUNTERS.items()}
    out: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            with contextlib.suppress(ValueError):
                out[wanted[name]] = float(value.split()[0])
    return out


@dataclass(frozen=True)
class TimelinePoint:
    """One interval ``[start, end)`` seconds into the run."""

    start: float
    end: float
    loads_per_s: float
    activations_per_s: float
    evictions_per_s: float
    slot_hit_rate: float  # NaN when no request was scheduled in the interval
    steps: float = 0.0  # engine steps run in the interval
    scheduled: float = 0.0  # sequence-steps scheduled in the interval (sum of batch sizes)

    @property
    def mean_batch(self) -> float:
        """Sequences per engine step in the interval: how full the slots let batches be."""
        return self.scheduled / self.steps if self.steps > 0 else math.nan

    @property
    def mid(self) -> float:
        return (self.start + self.end) / 2


def timeline(samples: list[tuple[float, dict[str, float]]]) -> list[TimelinePoint]:
    """Rates between consecutive ``(seconds, counters)`` samples."""
    points = []
    for (t0, a), (t1, b) in zip(samples, samples[1:], strict=False):
        dt = t1 - t0
        if dt <= 0:
            continue

        def delta(key: str, a=a, b=b) -> float:
            return b.get(key, 0.0) - a.get(key, 0.0)

        admitted = delta("slot_hits") + delta("slot_misses")  # requests scheduled for the first time
        hit_rate = delta("slot_hits") / admitted if admitted > 0 else math.nan
        points.append(
            TimelinePoint(
                t0,
                t1,
                delta("loads") / dt,
                delta("activations") / dt,
                delta("evictions") / dt,
                hit_rate,
                delta("steps"),
                delta("scheduled"),
            )
        )
    return points


class MetricsSampler:
    """Samples ``fetch()`` (the /metrics text) every ``interval_s`` until stopped."""

    def __init__(self, fetch: Callable[[], Awaitable[str]], interval_s: float = 1.0) -> None:
        if interval_s <= 0:
            raise ValueError("the sampling interval must be > 0")
        self.fetch = fetch
        self.interval_s = interval_s
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._t0 = 0.0
        self._task: asyncio.Task | None = None

    async def _sample(self) -> None:
        with contextlib.suppress(Exception):  # a missed scrape is a gap in the plot, not a failed run
            counters = parse_counters(await self.fetch())
            if counters:
                self.samples.append((asyncio.get_running_loop().time() - self._t0, counters))

    async def _run(self) -> None:
        while True:
            await self._sample()
            await asyncio.sleep(self.interval_s)

    def start(self) -> None:
        """Starts sampling in the background (call from the event loop, when the run starts)."""
        loop = asyncio.get_running_loop()
        self._t0 = loop.time()
        self._task = loop.create_task(self._run())

    async def stop(self) -> list[TimelinePoint]:
        """Takes a last sample and returns the timeline."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
            await self._sample()
        return timeline(self.samples)


def timeline_dicts(points: list[TimelinePoint]) -> list[dict]:
    return [asdict(p) for p in points]
