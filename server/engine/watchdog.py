"""Notices an engine step that runs longer than it should (a hung kernel, a deadlock, a GPU fault).

The engine thread only stamps the start and end of each step (two attribute writes, no lock: a float
or None is read atomically); whoever asks - the ``/health`` and ``/ready`` probes, on the event loop -
does the arithmetic. So a hung engine thread cannot hide its own hang, and Kubernetes restarts the pod
through the failing liveness probe.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class StepWatchdog:
    def __init__(self, limit_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit_s = limit_s  # 0: off
        self.clock = clock
        self.armed = False  # set once the engine is warm: the first (compiling) step is boot time
        self._started_at: float | None = None
        self._step = 0
        self._reported = 0  # the step already logged as hung

    def step_started(self) -> None:
        self._step += 1
        self._started_at = self.clock()

    def step_finished(self) -> None:
        self._started_at = None

    def hung_for(self) -> float | None:
        """Seconds the current step has run, if that is over the limit; else None."""
        started, step = self._started_at, self._step
        if not self.armed or self.limit_s <= 0 or started is None:
            return None
        elapsed = self.clock() - started
        if elapsed <= self.limit_s:
            return None
        if self._reported != step:
            self._reported = step
            log.error("engine step %d has run for %.1f s (limit %.1f s): reporting unhealthy",
                      step, elapsed, self.limit_s)  # fmt: skip
        return elapsed
