"""Which adapter sits in which device slot and pages: LRU order and refcounted pins (engine thread only).

An adapter holds a slot (an id the batch names its rows by) and the pages of slot memory its rank
needs (one per 16 ranks, ``slot_weights.blocks_for``); pages are interchangeable, so the memory
never fragments: a rank-64 adapter can take the pages of four rank-16 ones.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Residency:
    slot: int
    pages: tuple[int, ...]


class SlotTable:
    """Bookkeeping for ``num_slots`` slots over ``num_pages`` pages; it never touches tensors.

    A key is pinned while any running request uses it; pinned keys are never evicted, so a request
    keeps its weights from its first step to its last.
    """

    def __init__(self, num_slots: int, num_pages: int) -> None:
        self.num_slots = num_slots
        self.num_pages = num_pages
        self._resident: OrderedDict[str, Residency] = OrderedDict()  # oldest use first
        self._free_slots = list(range(num_slots - 1, -1, -1))  # pop() hands out slot 0 first
        self._free_pages = list(range(num_pages - 1, -1, -1))
        self._pins: dict[str, int] = {}

    def fits(self, keys: Iterable[str], need: Callable[[str], int], refill: Container[str] = ()) -> bool:
        """Whether ``keys`` can all be resident at once next to the pinned ones; ``need(key)``: the pages
        a key that is not resident needs (a pinned key may be not yet resident: it is activated
        after it is scheduled), or a resident one in ``refill`` (reloaded, maybe at another rank)."""
        keys = set(keys) | self.pinned()
        pages = 0
        for k in keys:
            held = len(self._resident[k].pages) if k in self._resident else 0
            pages += max(held, need(k)) if not held or k in refill else held
        return len(keys) <= self.num_slots and pages <= self.num_pages

    def holds(self, key: str) -> bool:
        """Whether ``key`` is resident (its LRU position unchanged)."""
        return key in self._resident

    def has_room(self, keep: set[str], pages: int) -> bool:
        """Whether ``assign`` can place a new key of ``pages`` pages, evicting only unpinned resident
        keys not in ``keep``."""
        return self._victims(keep, pages, need_slot=True) is not None

    def lookup(self, key: str) -> Residency | None:
        """Where ``key`` is (marked most recently used), or None if it is not resident."""
        where = self._resident.get(key)
        if where is not None:
            self._resident.move_to_end(key)
        return where

    def place(
        self, key: str, pages: int, keep: set[str], spare: set[str]
    ) -> tuple[Residency, list[tuple[str, Residency]]]:
        """``key`` resident on ``pages`` pages (``assign``, or ``resize`` if it holds another number),
        evicting no key of ``keep``, and none of ``spare`` unless it must."""
        where = self._resident.get(key)
        extra = pages if where is None else pages - len(where.pages)
        if extra > 0 and self._victims(keep | spare | {key}, extra, need_slot=where is None) is None:
            spare = set()
        if where is None:
            return self.assign(key, pages, keep | spare)
        if extra:
            return self.resize(key, pages, keep | spare)
        return where, []

    def assign(self, key: str, pages: int, keep: set[str]) -> tuple[Residency, list[tuple[str, Residency]]]:
        """A slot and ``pages`` pages for a non-resident ``key``: free ones, else those of the least
        recently used unpinned keys not in ``keep``. Returns (where, the evicted keys and where they
        were); raises if the room is not there (then nothing is evicted)."""
        if key in self._resident:
            raise ValueError(f"{key!r} is already resident")
        evicted = self._evict_for(key, keep, pages, need_slot=True)
        where = Residency(self._free_slots.pop(), tuple(self._free_pages.pop() for _ in range(pages)))
        self._resident[key] = where
        return where, evicted

    def resize(self, key: str, pages: int, keep: set[str]) -> tuple[Residency, list[tuple[str, Residency]]]:
        """Gives resident ``key`` (reloaded with another rank) ``pages`` pages in the same slot: its
        first pages are kept, the rest freed or taken like ``assign``'s."""
        where = self._resident[key]
        have = list(where.pages)
        evicted: list[tuple[str, Residency]] = []
        if pages > len(have):
            evicted = self._evict_for(key, keep | {key}, pages - len(have), need_slot=False)
            have += [self._free_pages.pop() for _ in range(pages - len(have))]
        else:
            self._free_pages += reversed(have[pages:])
            have = have[:pages]
        self._resident[key] = Residency(where.slot, tuple(have))
        return self._resident[key], evicted

    def _victims(self, keep: set[str], pages: int, need_slot: bool) -> list[str] | None:
        """The least recently used unpinned keys outside ``keep`` whose eviction makes room for
        ``pages`` pages (and a slot), fewest first; None if even all of them would not."""
        free_pages, free_slots, victims = len(self._free_pages), len(self._free_slots), []
        for k, where in self._resident.items():
            if free_pages >= pages and (free_slots or not need_slot):
                break
            if k in keep or self._pins.get(k):
                continue
            victims.append(k)
            free_pages += len(where.pages)
            free_slots += 1
        if free_pages >= pages and (free_slots or not need_slot):
            return victims
        return None

    def _evict_for(
        self, key: str, keep: set[str], pages: int, need_slot: bool
    ) -> list[tuple[str, Residency]]:
        victims = self._victims(keep, pages, need_slot)
        if victims is None:
            raise RuntimeError(
                f"no LoRA slot memory for {key!r}: {pages} pages wanted, {len(self._free_pages)} of "
                f"{self.num_pages} free, the rest pinned or in use"
            )
        return [(victim, self._release(victim)) for victim in victims]

    def release(self, key: str) -> Residency | None:
        """Drops ``key`` from its slot and pages (which become free); returns where it was."""
        return self._release(key) if key in self._resident else None

    def _release(self, key: str) -> Residency:
        where = self._resident.pop(key)
        self._free_slots.append(where.slot)
        self._free_pages += reversed(where.pages)
        return where

    def pin(self, key: str) -> None:
        self._pins[key] = self._pins.get(key, 0) + 1

    def unpin(self, key: str) -> int:
        """Decrements the pin count of ``key``; returns the remaining count."""
        count = self._pins.get(key, 0) - 1
        if count < 0:
            raise RuntimeError(f"unpin of {key!r} without a matching pin")
        if count:
            self._pins[key] = count
        else:
            self._pins.pop(key)
        return count

    def pinned(self) -> set[str]:
        return set(self._pins)

    def resident(self) -> list[str]:
        return sorted(self._resident)
