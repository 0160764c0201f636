"""Puts adapters into slot memory on the engine thread: takes pages from the slot table (evicting
least recently used adapters), copies the weights in, and records what each slot holds."""

from __future__ import annotations

from server.lora.adapter import LoRAAdapter
from server.lora.counters import LoRACounters
from server.lora.slot_fill import SlotFiller
from server.lora.slot_rows import TargetFacts
from server.lora.slot_table import Residency, SlotTable
from server.lora.slot_weights import blocks_for


class Placement:
    def __init__(self, slots: SlotTable, filler: SlotFiller, counters: LoRACounters,
                 slot_epoch: dict[str, object]) -> None:  # fmt: skip
        self.slots = slots
        self.filler = filler
        self.rows = filler.rows
        self.counters = counters
        self.slot_epoch = slot_epoch  # the manager's: key -> epoch of the weights its slot holds

    def evicted(self, evicted: list[tuple[str, Residency]]) -> None:
        """Unmaps the slots of keys the table evicted (their pages now belong to someone else)."""
        for key, where in evicted:
            self.slot_epoch.pop(key, None)
            self.rows.release(where.slot)
            self.counters.add(evictions=1)

    def landed(self, key: str, where: Residency, facts: list[TargetFacts], epoch: object) -> None:
        """``key``'s copy into ``where`` is done: its slot serves those weights from now."""
        self.rows.commit(where.slot, where.pages, facts)
        self.slot_epoch[key] = epoch
        self.counters.add(activations=1)

    def drop(self, key: str) -> None:
        """``key`` leaves its slot and pages (a failed copy, an unloaded adapter no request uses any
        more): no stale page-table row names them."""
        where = self.slots.release(key)
        self.slot_epoch.pop(key, None)
        if where is not None:
            self.rows.release(where.slot)

    def refill(self, key: str, adapter: LoRAAdapter, epoch: object, keep: set[str], spare: set[str],
               where: Residency | None) -> int:  # fmt: skip
        """Copies ``adapter`` into pages for ``key`` (``where``: its residency now, if any), evicting
        no key of ``keep`` and none of ``spare`` unless it must; returns its slot. A resident key
        reloaded at a higher rank while the memory is pinned full serves its old weights until pages
        free up; a failed copy leaves the key not resident."""
        try:
            where, evicted = self.slots.place(key, blocks_for(adapter.rank), keep, spare)
        except RuntimeError:
            if where is None:
                raise
            return where.slot
        self.evicted(evicted)
        try:
            facts = self.filler.fill_now(where, adapter)
        except BaseException:
            self.drop(key)
            raise
        self.landed(key, where, facts, epoch)
        return where.slot
