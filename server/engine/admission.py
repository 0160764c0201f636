"""In which order waiting requests are offered a place in the running batch.

Arrival order, with two refinements:

- Longest cached prefix first (SGLang's "LPM"): a request that finds more of its prompt in the
  prefix cache has less to compute, so it goes ahead of those that find less. In a burst of requests
  under a few shared system prompts this serves each prompt's followers as soon as its first request
  has computed it, instead of computing every other prompt first. Only while at most
  ``LPM_MAX_WAITING`` requests wait (each needs a cache lookup per step).
- When the adapter slots are short (the adapters the waiting requests name do not all fit next to
  the running ones), requests that need no new slot copy go first - base-model requests and requests
  whose adapter is already resident - so the batch stays full while slots turn over.

Age bounds all reordering: a request that has waited ``max_wait_s`` ("starving") goes first, and
while it cannot get a slot one running adapter is drained for it: the one with the fewest running
requests (then the fewest tokens left) is admitted nothing more, so its slot frees when those finish
and the starving request takes it (nothing else can: when it does not fit, no other new adapter
does). Requests of every other resident adapter keep joining, so the batch stays full. The drained
adapter's request count never grows, so no request waits on reordering past the bound plus the time
one adapter's running requests take to finish.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from server.engine.adapter_slots import AdapterHandle, AdapterSlots
from server.engine.sequence import Sequence

LPM_MAX_WAITING = 128


@dataclass(frozen=True)
class AdmissionOrder:
    max_wait_s: float  # past this age a waiting request is no longer overtaken

    def is_starving(self, seq: Sequence, now: float) -> bool:
        return now - seq.arrival_time >= self.max_wait_s

    def order(
        self,
        waiting: Iterable[Sequence],
        slots: AdapterSlots | None,
        active: set[str],
        now: float,
        cached_blocks: Callable[[Sequence], int] | None = None,
    ) -> list[Sequence]:
        """``waiting`` in the order to try them this step (``active``: adapters of running requests;
        ``cached_blocks``: how many of a request's blocks the prefix cache holds, None: no cache)."""
        candidates = list(waiting)
        if len(candidates) < 2:
            return candidates
        resident: set[str] | None = None  # None: slots are not short
        if slots is not None and not slots.fits(
            active | {s.adapter_key for s in candidates if s.adapter_key}
        ):
            resident = set(slots.resident())
        if cached_blocks is None or len(candidates) > LPM_MAX_WAITING:
            cached_blocks = None
            if resident is None:
                return candidates

        def rank(seq: Sequence) -> tuple[int, int]:
            if self.is_starving(seq, now):
                return (0, 0)
            needs_copy = (
                resident is not None and seq.adapter_key is not None and seq.adapter_key not in resident
            )
            return (1 + needs_copy, -cached_blocks(seq) if cached_blocks is not None else 0)

        return sorted(candidates, key=rank)  # stable: arrival order within a rank

    def prefetch_order(self, waiting: Iterable[Sequence], now: float) -> list[AdapterHandle]:
        """The waiting requests' adapters in the order free slots should go to them: starving
        requests' first (oldest first), then by how many waiting requests each serves (most first,
        then the oldest). A slot filled for the adapter with the longest queue admits the most
        requests, so batches stay full while slots turn over under a skewed (Zipf) popularity."""
        demand: Counter[str] = Counter()
        first: dict[str, tuple[int, Sequence]] = {}
        for i, seq in enumerate(waiting):
            key = seq.adapter_key
            if key is not None and seq.adapter is not None:
                demand[key] += 1
                first.setdefault(key, (i, seq))

        def rank(key: str) -> tuple[int, int, int]:
            index, seq = first[key]
            return (0, 0, index) if self.is_starving(seq, now) else (1, -demand[key], index)

        return [first[key][1].adapter for key in sorted(first, key=rank)]

    @staticmethod
    def drain_victim(running: Iterable[Sequence]) -> str | None:
        """The adapter whose slot frees soonest if it is admitted nothing more (None: none runs)."""
        count: Counter[str] = Counter()
        left: Counter[str] = Counter()
        for seq in running:
            if seq.adapter_key is not None:
                count[seq.adapter_key] += 1
                left[seq.adapter_key] += seq.params.max_tokens - seq.num_output_tokens
        return min(count, key=lambda k: (count[k], left[k], k), default=None)
