"""Device slots filled ahead of time for waiting requests, off the engine thread.

Each step the engine names the adapters its waiting requests use, most wanted first (starving
requests' first, then those with the most waiting requests). The first few (as many as the slot
memory has pages: what can be scheduled soon; never more than the host cache holds) are loaded into host memory if it does
not hold them - the only place loads for waiting requests start: loading every adapter of a long
queue of distinct ones would churn the host LRU, each load evicting one wanted sooner. For each one
whose weights are in host memory but in no slot, a slot and the pages its rank needs are reserved -
free ones, or those of the least recently used adapters that no running or waiting request needs -
and the worker packs and copies the adapter into them. The slot stays pinned while the copy runs
(nothing evicts or reads it) and its request reads as loading; the next step commits the finished copy, and the request is scheduled on a
resident adapter, with no copy on the critical path. Engine thread only, like the slot table.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait

from server.lora.counters import LoRACounters
from server.lora.host_cache import HostCache
from server.lora.placement import Placement
from server.lora.ref import AdapterRef
from server.lora.slot_fill import SlotFiller
from server.lora.slot_rows import TargetFacts
from server.lora.slot_table import SlotTable
from server.lora.slot_weights import blocks_for

log = logging.getLogger(__name__)


class SlotPrefetcher:
    def __init__(
        self,
        slots: SlotTable,
        filler: SlotFiller,
        cache: HostCache,
        slot_is_current: Callable[[str], bool],
        placement: Placement,
    ) -> None:
        self.slots = slots
        self.slot_is_current = slot_is_current  # the manager's: a resident key's weights are current
        self.filler = filler
        self.cache = cache
        self.counters: LoRACounters = cache.counters
        self.placement = placement  # the manager's: evictions, and what a landed copy records
        self.wanted: set[str] = set()  # adapters of the waiting requests, as of the last call
        self._fills: dict[str, tuple[Future[list[TargetFacts]], object]] = {}  # key -> (copy, epoch)

    def is_filling(self, key: str) -> bool:
        return key in self._fills

    def wait_for_a_fill(self, timeout: float) -> bool:
        """Blocks until one slot copy in flight finishes, or ``timeout``; False if none is in flight."""
        if not self._fills:
            return False
        wait([future for future, _ in self._fills.values()], timeout, return_when=FIRST_COMPLETED)
        return True

    def prefetch(self, adapters: list[AdapterRef]) -> None:
        """Starts host loads and slot fills for ``adapters`` (the waiting requests', most wanted first)."""
        self.commit()
        unique: dict[str, AdapterRef] = {}
        for adapter in adapters:
            unique.setdefault(adapter.key, adapter)
        self.wanted = set(unique)
        # Twice what the slot memory holds at two pages (32 ranks) an adapter: what can run soon.
        for key in list(unique)[: min(self.slots.num_pages, self.cache.max_cpu_loras)]:
            held = self.slots.holds(key)
            if key in self._fills or (held and self.slot_is_current(key)):
                continue
            entry = self.cache.peek(key)
            if entry is None:
                if self.cache.state(key) in ("missing", "ready"):  # ready: dropped since the peek
                    self.cache.prefetch(unique[key])
                continue
            if held:
                continue  # older weights in its slot: activate() rewrites it in place when scheduled
            pages = blocks_for(entry[0].rank)
            if not self.slots.has_room(self.wanted, pages):
                # The slot memory is running or promised to more wanted waiting requests. Loading the
                # rest of the list now as well read 2.4x the adapters (1,111 vs 464 in the offline
                # replica of the saturated uniform run, no faster): they churn the host cache early.
                return
            where, evicted = self.slots.assign(key, pages, keep=self.wanted)
            self.placement.evicted(evicted)
            self.slots.pin(key)  # until the copy is committed
            self._fills[key] = (self.filler.submit(where, entry[0]), entry[1])

    def commit(self, wait_for: set[str] | frozenset[str] = frozenset()) -> None:
        """Commits finished copies (and waits for those of ``wait_for``): their slots serve from now."""
        for key, (future, epoch) in list(self._fills.items()):
            if not future.done() and key not in wait_for:
                continue
            del self._fills[key]
            self.slots.unpin(key)
            where = self.slots.lookup(key)
            try:
                facts = future.result()
            except Exception:  # the engine thread will copy it itself, and report a failure there
                log.exception("prefetching adapter '%s' into slot %d failed", key, where.slot)
                self.placement.drop(key)
                continue
            self.placement.landed(key, where, facts, epoch)
            self.counters.add(prefetch_fills=1)
