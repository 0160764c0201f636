"""The device tier of adapter residency: which adapter sits in which slot, refilled from the host
cache; implements the engine's ``AdapterSlots`` protocol.

Only the engine thread touches the slots (``activate``/``pin``/``unpin``/``prefetch``/``prepare_batch``).
A slot remembers the epoch of the weights it holds; after a reload the next ``activate`` rewrites it
in place (vLLM's ``load_inplace``: running requests continue on the new weights; at a higher rank
only once spare pages exist). An unloaded adapter ("retiring") keeps its slot, untouched, until no
running request pins it. Slots of waiting requests' adapters are filled ahead of time off the engine
thread (``prefetch.py``). An adapter takes a slot and the pages of slot memory its rank needs
(``slot_table.py``, ``placement.py``); each page is one contiguous row of the whole model
(``slot_rows.py``, ``slot_fill.py``). Disk reads happen on loader threads, started by ``prefetch``
only (for the most wanted few); ``readiness`` keeps a reference to the host
copy it found, so ``activate`` has it even if the host LRU drops it in between.
"""

from __future__ import annotations

from collections.abc import Hashable

from server.lora.cache_identity import CacheIdentities
from server.lora.held_copies import HeldCopies
from server.lora.host_cache import HostCache
from server.lora.layers import LoRAModel
from server.lora.placement import Placement
from server.lora.prefetch import SlotPrefetcher
from server.lora.ref import AdapterRef
from server.lora.slot_fill import SlotFiller
from server.lora.slot_rows import SlotRows
from server.lora.slot_table import SlotTable
from server.lora.slot_weights import blocks_for


class AdapterManager:
    def __init__(self, lora: LoRAModel, cache: HostCache) -> None:
        self.lora = lora
        self.cache = cache
        self.counters = cache.counters
        self.rows = SlotRows(lora)
        self.filler = SlotFiller(self.rows)
        self._slots = SlotTable(lora.max_loras, self.rows.num_pages)  # engine thread only
        self._slot_epoch: dict[str, object] = {}
        self._placement = Placement(self._slots, self.filler, self.counters, self._slot_epoch)
        self._prefetcher = SlotPrefetcher(
            self._slots, self.filler, cache, self._slot_is_current, self._placement
        )
        self._retiring: set[str] = set()  # guarded by cache.lock: unloaded keys awaiting unpin
        self._held = HeldCopies(cache, self.rows.table.blocks)  # host copies readiness() saw
        self._identities = CacheIdentities(cache)

    @property
    def max_loras(self) -> int:
        """The slot memory, in adapters of ``max_lora_rank`` (lower ranks take fewer pages)."""
        return self.rows.num_pages // self.rows.table.blocks

    def close(self) -> None:
        self.filler.close()

    # --- any thread ---------------------------------------------------------------------------
    def retire(self, name: str) -> None:
        """``name`` is unloaded: its host copies go now, its slots once no running request pins them."""
        with self.cache.lock:
            self._retiring.update(self.cache.keys_using(name))
            self.cache.invalidate(name)

    def revive(self, name: str) -> None:
        """``name`` was loaded again: its keys serve normally (no longer waiting to be freed)."""
        with self.cache.lock:
            self._retiring.difference_update(self.cache.keys_using(name))

    # --- engine thread (the engine's AdapterSlots protocol) -----------------------------------
    def readiness(self, adapter: AdapterRef) -> str:
        """'ready' | 'loading' | 'error'. Starts no load: asked of every waiting request, loading each
        would churn the host cache once they name more adapters than it holds (thousands of disk reads
        for a few hundred requests, measured); ``prefetch`` loads the most wanted few instead."""
        key = adapter.key
        self._prefetcher.commit()
        if self._prefetcher.is_filling(key):
            return "loading"
        if self._current(key):
            return "ready"
        entry = self.cache.peek(key)
        if entry is not None:
            self._held.hold(key, entry)
            return "ready"
        return "error" if self.cache.state(key) == "error" else "loading"

    def load_error(self, adapter: AdapterRef) -> str | None:
        return self.cache.error(adapter.key)

    def prefetch(self, adapters: list[AdapterRef]) -> None:
        self._prefetcher.prefetch(adapters)

    def idle_wait(self, timeout: float) -> None:
        if not self._prefetcher.wait_for_a_fill(timeout):
            with self.cache.load_ended:  # some background load ends
                self.cache.load_ended.wait(timeout)

    def cache_identity(self, adapter: AdapterRef) -> Hashable:
        return self._identities.of(adapter.key)

    def stale_cache_identities(self) -> list[Hashable]:
        return self._identities.stale()

    def fits(self, keys: set[str]) -> bool:
        return self._slots.fits(keys, self._held.pages, refill=self._held)  # held and resident: reloaded

    def activate(self, keys: set[str]) -> dict[str, int]:
        """Makes every key resident (copying weights into free or LRU-evicted pages); key -> slot."""
        self._reap_retired()
        self._prefetcher.commit(wait_for=keys)
        copies = {k: self._held.get(k) for k in keys if not self._current(k)}  # a failed load evicts nothing
        if not self._slots.fits(
            keys, lambda k: blocks_for(copies[k][0].rank) if k in copies else self._held.pages(k)
        ):
            raise RuntimeError(f"{len(keys)} adapters do not fit in the slot memory beside the pinned")
        slots: dict[str, int] = {}
        # Resident ones first, reloaded resident ones last: a refill at a higher rank takes only spare pages.
        for key in sorted(keys, key=lambda k: (k in copies, self._slots.holds(k))):
            where = self._slots.lookup(key)  # marked most recently used
            if key not in copies:
                slots[key] = where.slot
            else:
                slots[key] = self._placement.refill(key, *copies[key], keys, self._prefetcher.wanted, where)
        self._held.clear()
        return slots

    def _current(self, key: str) -> bool:
        return self._slots.holds(key) and self._slot_is_current(key)

    def _slot_is_current(self, key: str) -> bool:
        """A resident key keeps its slot while retiring (running requests finish on those weights) or
        while its weights' epoch has not moved."""
        with self.cache.lock:
            if key in self._retiring and self.cache.state(key) == "ready":  # loaded again since
                self._retiring.discard(key)
            if key in self._retiring:
                return True
            return self._slot_epoch.get(key) == self.cache.epoch_of(key)

    def pin(self, key: str) -> None:
        """A request using ``key`` is scheduled: a slot hit if its weights are already in place."""
        hit = self._current(key)
        self.counters.add(**{"slot_hits" if hit else "slot_misses": 1})
        self._slots.pin(key)

    def unpin(self, key: str) -> None:
        if self._slots.unpin(key) == 0:
            self._reap_retired()

    def bind_step_buffers(self, host, device) -> None:
        self.lora.backend.batch.bind(host, device)

    def prepare_batch(self, seq_slots: list[int], seq_num_tokens: list[int], static: bool = False) -> None:
        self.lora.backend.plan(seq_slots, seq_num_tokens, static)

    def graph_safe(self) -> bool:
        """Only fixed launches replay: no slot may need the DoRA or lora_bias host passes."""
        return self.lora.backend.capturable and not self.rows.any_host_pass()

    def resident(self) -> list[str]:
        self._reap_retired()
        return self._slots.resident()

    def _reap_retired(self) -> None:
        """Frees the slots of unloaded adapters that no running request pins any more."""
        pinned = self._slots.pinned()
        with self.cache.lock:
            done = {k for k in self._retiring if k not in pinned}
            self._retiring -= done
        for key in done:
            self._placement.drop(key)
