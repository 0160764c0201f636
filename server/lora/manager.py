"""The device tier of adapter residency: which adapter sits in which slot, refilled from the host
cache; implements the engine's ``AdapterSlots`` protocol.

Only the engine thread touches the slots (``activate``/``pin``/``unpin``/``prepare_batch``). A slot
remembers the epoch of the weights it holds; after a reload the next ``activate`` rewrites it in
place (vLLM's ``load_inplace``: running requests continue on the new weights). An unloaded adapter
("retiring") keeps its slot, untouched, until no running request pins it.
"""

from __future__ import annotations

from server.lora.backend import LoRABackend
from server.lora.host_cache import HostCache
from server.lora.layers import LoRAModel
from server.lora.ref import AdapterRef
from server.lora.slot_table import SlotTable


def needs_host_pass(adapter) -> bool:
    """DoRA magnitudes or lora_bias vectors: the backend applies those per segment on the host."""
    return any(w.dora_g is not None or w.bias is not None for w in adapter.modules.values())


class AdapterManager:
    def __init__(self, lora: LoRAModel, cache: HostCache) -> None:
        self.lora = lora
        self.cache = cache
        self.counters = cache.counters
        self._slots = SlotTable(lora.max_loras)  # engine thread only
        self._slot_epoch: dict[str, object] = {}
        self._retiring: set[str] = set()  # guarded by cache.lock: unloaded keys awaiting unpin
        self._host_pass_slots: dict[int, bool] = {}  # slot -> holds DoRA or lora_bias weights

    @property
    def max_loras(self) -> int:
        return self.lora.max_loras

    @property
    def backend(self) -> LoRABackend:
        return self.lora.backend

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
        """'ready' | 'loading' | 'error'; an adapter the host cache dropped is fetched again."""
        state = self.cache.state(adapter.key)
        if state == "missing":
            self.cache.prefetch(adapter)
            state = self.cache.state(adapter.key)
        return "loading" if state == "missing" else state

    def load_error(self, adapter: AdapterRef) -> str | None:
        return self.cache.error(adapter.key)

    def fits(self, keys: set[str]) -> bool:
        return self._slots.fits(keys)

    def activate(self, keys: set[str]) -> dict[str, int]:
        """Makes every key resident (copying weights into free or LRU-evicted slots); key -> slot."""
        self._reap_retired()
        if not self._slots.fits(keys):
            raise RuntimeError(
                f"{len(keys)} adapters do not fit in {self.max_loras} slots next to the pinned ones"
            )
        slots: dict[str, int] = {}
        for key in sorted(keys, key=lambda k: self._slots.lookup(k) is None):  # resident ones first
            slot = self._slots.lookup(key)
            if slot is not None and self._slot_is_current(key):
                slots[key] = slot
                continue
            adapter, epoch = self.cache.get(key)  # before taking a slot: a failed load evicts nothing
            if slot is None:
                slot, evicted = self._slots.assign(key, keep=set(keys))
                if evicted is not None:
                    self._slot_epoch.pop(evicted, None)
                    self.counters.add(evictions=1)
            self.lora.set_slot(slot, adapter)
            self._host_pass_slots[slot] = needs_host_pass(adapter)
            self._slot_epoch[key] = epoch
            self.counters.add(activations=1)
            slots[key] = slot
        return slots

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
        self._slots.pin(key)

    def unpin(self, key: str) -> None:
        if self._slots.unpin(key) == 0:
            self._reap_retired()

    def bind_step_buffers(self, host, device) -> None:
        self.lora.backend.batch.bind(host, device)

    def prepare_batch(self, seq_slots: list[int], seq_num_tokens: list[int], static: bool = False) -> None:
        self.lora.backend.plan(seq_slots, seq_num_tokens, static)

    def graph_safe(self) -> bool:
        """A captured decode replays the backend's fixed launches only: no slot may need the DoRA or
        lora_bias passes, which loop over segments on the host."""
        return self.lora.backend.capturable and not any(self._host_pass_slots.values())

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
            slot = self._slots.release(key)
            self._slot_epoch.pop(key, None)
            if slot is not None:
                self.lora.clear_slot(slot)
                self._host_pass_slots.pop(slot, None)
