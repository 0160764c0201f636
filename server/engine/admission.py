"""In which order waiting requests are offered a place in the running batch.

Arrival order, unless the adapter slots are short (the adapters the waiting requests name do not all
fit next to the running ones): then requests that need no new slot copy go first - base-model
requests and requests whose adapter is already resident - so the batch stays full while slots
turn over. Age bounds the reordering: a request that has waited ``max_wait_s`` goes first, and
while it cannot get a slot nothing behind it is admitted (the scheduler holds the line), so the
running requests drain until a slot frees for it. No request waits on reordering past that bound
plus the time the running requests take to finish.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from server.engine.adapter_slots import AdapterSlots
from server.engine.sequence import Sequence


@dataclass(frozen=True)
class AdmissionOrder:
    max_wait_s: float  # past this age a waiting request is no longer overtaken

    def is_starving(self, seq: Sequence, now: float) -> bool:
        return now - seq.arrival_time >= self.max_wait_s

    def order(
        self, waiting: Iterable[Sequence], slots: AdapterSlots | None, active: set[str], now: float
    ) -> list[Sequence]:
        """``waiting`` in the order to try them this step (``active``: adapters of running requests)."""
        candidates = list(waiting)
        if slots is None:
            return candidates
        wanted = {s.adapter_key for s in candidates if s.adapter_key}
        if slots.fits(active | wanted):
            return candidates
        resident = set(slots.resident())

        def rank(seq: Sequence) -> int:
            if self.is_starving(seq, now):
                return 0
            return 1 if seq.adapter_key is None or seq.adapter_key in resident else 2

        return sorted(candidates, key=rank)  # stable: arrival order within a rank
