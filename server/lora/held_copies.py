"""The host copies the scheduler saw ready this step, held for the adapter manager until it activates them."""

from __future__ import annotations

from server.lora.adapter import LoRAAdapter
from server.lora.host_cache import HostCache
from server.lora.slot_weights import blocks_for


class HeldCopies:
    """What ``readiness`` found in the host cache, kept until ``activate``: it has the copy even if the
    host LRU drops it in between, and ``fits`` knows the pages each needs (a key not seen: the most,
    ``max_pages``). Engine thread only."""

    def __init__(self, cache: HostCache, max_pages: int) -> None:
        self.cache = cache
        self.max_pages = max_pages
        self._copies: dict[str, tuple[LoRAAdapter, object]] = {}
        self._pages: dict[str, int] = {}

    def hold(self, key: str, entry: tuple[LoRAAdapter, object]) -> None:
        self._copies[key] = entry
        self._pages[key] = blocks_for(entry[0].rank)

    def __contains__(self, key: object) -> bool:
        return key in self._copies

    def pages(self, key: str) -> int:
        return self._pages.get(key, self.max_pages)

    def get(self, key: str) -> tuple[LoRAAdapter, object]:
        """What ``readiness`` found, if still current; a disk read here only if a reload raced it."""
        held = self._copies.get(key)
        if held is not None and held[1] == self.cache.epoch_of(key):
            return held
        return self.cache.peek(key) or self.cache.get(key)

    def clear(self) -> None:
        self._copies.clear()
        self._pages.clear()
