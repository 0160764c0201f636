"""Which adapter sits in which device slot: LRU order and refcounted pins (engine thread only)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable


class SlotTable:
    """Bookkeeping for ``num_slots`` device slots; it never touches tensors.

    A key is pinned while any running request uses it; pinned keys are never evicted, so a request
    keeps its weights from its first step to its last.
    """

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # oldest use first
        self._free = list(range(num_slots - 1, -1, -1))  # pop() hands out slot 0 first
        self._pins: dict[str, int] = {}

    def fits(self, keys: Iterable[str]) -> bool:
        """Whether ``keys`` can all be resident at once next to the pinned ones."""
        return len(set(keys) | self.pinned()) <= self.num_slots

    def holds(self, key: str) -> bool:
        """Whether ``key`` is resident (its LRU position unchanged)."""
        return key in self._slot_of

    def has_room(self, keep: set[str]) -> bool:
        """Whether ``assign`` can place a new key: a free slot, or an unpinned resident key not in ``keep``."""
        return bool(self._free) or any(k not in keep and not self._pins.get(k) for k in self._slot_of)

    def lookup(self, key: str) -> int | None:
        """The slot of ``key`` (marked most recently used), or None if it is not resident."""
        slot = self._slot_of.get(key)
        if slot is not None:
            self._slot_of.move_to_end(key)
        return slot

    def assign(self, key: str, keep: set[str]) -> tuple[int, str | None]:
        """A slot for a non-resident ``key``: a free one, else the least recently used unpinned key's
        that is not in ``keep``. Returns (slot, evicted key or None); raises if none is available."""
        if key in self._slot_of:
            raise ValueError(f"{key!r} is already resident")
        evicted = None
        if self._free:
            slot = self._free.pop()
        else:
            evicted = next((k for k in self._slot_of if k not in keep and not self._pins.get(k)), None)
            if evicted is None:
                raise RuntimeError(
                    f"no LoRA slot free for {key!r}: all {self.num_slots} are pinned or in use"
                )
            slot = self._slot_of.pop(evicted)
        self._slot_of[key] = slot
        return slot, evicted

    def release(self, key: str) -> int | None:
        """Drops ``key`` from its slot (which becomes free); returns the slot."""
        slot = self._slot_of.pop(key, None)
        if slot is not None:
            self._free.append(slot)
        return slot

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
        return sorted(self._slot_of)
