"""Adapter residency across three tiers: store on disk -> parsed in host memory -> device slots.

Any thread may ask about, prefetch, register, reload or unload adapters (``AdapterHost``, loading in
a thread pool so the engine keeps decoding other adapters meanwhile). Only the engine thread touches
the device slots (``activate``/``pin``/``unpin``/``set_batch``). A slot remembers the epoch of the
weights it holds; after a reload the next ``activate`` rewrites it in place (vLLM's ``load_inplace``:
running requests continue on the new weights). An unloaded adapter keeps its slot, untouched, until
no running request pins it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from server.engine.types import AdapterRef
from server.lora.host import AdapterHost, AdapterState, LoRACounters
from server.lora.layers import LoRAModel
from server.lora.slots import SlotTable
from server.lora.spec import BaseModelSpec


class AdapterManager:
    def __init__(
        self,
        model: LoRAModel,
        store_dir: Path,
        base: BaseModelSpec,
        max_loras: int,
        max_cpu_loras: int,
        max_rank: int,
        device: str | torch.device,
        dtype: torch.dtype,
        load_workers: int = 2,
    ) -> None:
        if max_loras > model.max_loras or max_rank > model.max_rank:
            raise ValueError(
                f"manager wants {max_loras} slots of rank {max_rank}; the model holds {model.max_loras} "
                f"of rank {model.max_rank}"
            )
        self.lora = model
        self.base = base
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.device = torch.device(device)
        self.dtype = dtype
        self.host = AdapterHost(model, store_dir, base, max_cpu_loras, max_rank, load_workers)
        self._slots = SlotTable(max_loras)  # engine thread only
        self._slot_epoch: dict[str, object] = {}
        self._retiring: set[str] = set()  # guarded by host.lock: unloaded keys awaiting unpin

    @property
    def counters(self) -> LoRACounters:
        return self.host.counters

    # --- any thread ---------------------------------------------------------------------------
    def exists(self, name: str) -> bool:
        return self.host.exists(name)

    def list_names(self) -> list[str]:
        return self.host.list_names()

    def path_of(self, name: str) -> Path:
        return self.host.path_of(name)

    def register_path(self, name: str, path: Path) -> None:
        """Serves the adapter in directory ``path`` as ``name``; a new path drops any old weights."""
        self.host.register_path(name, path)

    def prefetch(self, ref: AdapterRef) -> None:
        """Starts a background disk -> host load of ``ref`` (a name or a composition) unless cached."""
        self.host.prefetch(ref)

    def state(self, ref: AdapterRef) -> AdapterState:
        return self.host.state(ref.key)

    def error(self, ref: AdapterRef) -> str | None:
        return self.host.error(ref.key)

    def load_now(self, name: str, inplace: bool = False) -> None:
        """Synchronous, validated load into the host cache (vLLM's load_lora_adapter); ``inplace`` reloads."""
        if inplace:
            self.host.reload(name)
        else:
            self.host.get(name)
        with self.host.lock:
            self._retiring.difference_update(self.host.keys_using(name))

    def reload(self, name: str) -> None:
        """Re-reads ``name`` from disk; once validated, new requests (and the next steps) use the new weights."""
        self.load_now(name, inplace=True)

    def unload(self, name: str) -> None:
        """Drops ``name`` from the host cache (and its path registration); its slot is freed once unpinned."""
        with self.host.lock:
            self.host.forget_path(name)
            self._retiring.update(self.host.keys_using(name))
            self.host.invalidate(name)

    def counters_snapshot(self) -> LoRACounters:
        with self.host.lock:
            return replace(self.counters)

    def close(self) -> None:
        self.host.close()

    # --- engine thread ------------------------------------------------------------------------
    def can_activate(self, keys: set[str]) -> bool:
        """Whether ``keys`` fit in the slots next to every pinned adapter."""
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
            with self.host.lock:
                if key in self._retiring and self.host.state(key) == "ready":  # loaded again since
                    self._retiring.discard(key)
                retiring = key in self._retiring
            if slot is not None and (retiring or self._slot_epoch.get(key) == self.host.epoch_of(key)):
                slots[key] = slot
                continue
            adapter, epoch = self.host.get(key)  # before taking a slot: a failed load evicts nothing
            if slot is None:
                slot, evicted = self._slots.assign(key, keep=set(keys))
                if evicted is not None:
                    self._slot_epoch.pop(evicted, None)
                    self.counters.evictions += 1
            self.lora.set_slot(slot, adapter)
            self._slot_epoch[key] = epoch
            self.counters.activations += 1
            slots[key] = slot
        return slots

    def pin(self, key: str) -> None:
        """Called when a request using ``key`` starts running (refcounted)."""
        self._slots.pin(key)

    def unpin(self, key: str) -> None:
        """Called when such a request finishes or is preempted."""
        if self._slots.unpin(key) == 0:
            self._reap_retired()

    def set_batch(self, seq_slots: list[int], seq_num_tokens: list[int]) -> None:
        """The engine's per-step hook: sequence i uses slot ``seq_slots[i]`` (-1 = base) for its tokens."""
        self.lora.set_batch(seq_slots, seq_num_tokens)

    def resident(self) -> list[str]:
        self._reap_retired()
        return self._slots.resident()

    def gate(self) -> AdapterGate:
        return AdapterGate(self)

    def _reap_retired(self) -> None:
        """Frees the slots of unloaded adapters that no running request pins any more."""
        pinned = self._slots.pinned()
        with self.host.lock:
            done = {k for k in self._retiring if k not in pinned}
            self._retiring -= done
        for key in done:
            slot = self._slots.release(key)
            self._slot_epoch.pop(key, None)
            if slot is not None:
                self.lora.clear_slot(slot)


class AdapterGate:
    """The scheduler's view of the manager (``server.engine.scheduler.AdapterGate``)."""

    def __init__(self, manager: AdapterManager) -> None:
        self.manager = manager

    def status(self, seq) -> str:
        """'ready' | 'loading' | 'error'; an adapter the host cache dropped is fetched again."""
        state = self.manager.state(seq.adapter)
        if state != "missing":
            return state
        self.manager.prefetch(seq.adapter)
        state = self.manager.state(seq.adapter)
        return "loading" if state == "missing" else state

    def error(self, seq) -> str:
        return self.manager.error(seq.adapter) or "unknown error"

    def fits(self, keys: set[str]) -> bool:
        return self.manager.can_activate(keys)

    def pin(self, key: str) -> None:
        self.manager.pin(key)

    def unpin(self, key: str) -> None:
        self.manager.unpin(key)
