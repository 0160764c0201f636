"""Names for the adapter weights a request runs with, for the engine's prefix cache.

K/V computed under an adapter are only valid for those exact weights, so the engine keys its cached
blocks by ``(adapter key, epoch)``: the epoch moves on every reload, unload, delete and re-upload
(``HostCache.invalidate``), so a re-uploaded adapter never meets the K/V of its predecessor. The
ledger remembers what it handed out, to tell the engine which names went stale (their blocks are
then dropped) - scanning only when the host cache's ``generation`` moved.
"""

from __future__ import annotations

from server.lora.host_cache import HostCache


class CacheIdentities:
    def __init__(self, cache: HostCache) -> None:
        self.cache = cache
        self._issued: set[tuple[str, object]] = set()
        self._seen_generation = cache.generation

    def of(self, key: str) -> tuple[str, object]:
        identity = (key, self.cache.epoch_of(key))
        self._issued.add(identity)
        return identity

    def stale(self) -> list[tuple[str, object]]:
        """Identities handed out whose weights have changed since; each is reported once."""
        generation = self.cache.generation  # read first: a bump during the scan is seen next time
        if generation == self._seen_generation:
            return []
        self._seen_generation = generation
        stale = [i for i in self._issued if self.cache.epoch_of(i[0]) != i[1]]
        self._issued.difference_update(stale)
        return stale
