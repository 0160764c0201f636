"""Automatic prefix caching: full KV blocks named by a hash chain, found again by later requests.

A full block's name is ``sha256(parent block's name, identity, the block's token ids)``, where the
identity is that of the adapter weights the K/V were computed with (None: the base model). So a
block names its whole prefix: the same tokens under two adapters, or under one adapter before and
after its weights changed, never share K/V (their K and V differ), while base-model requests share
among themselves. sha256 rather than Python's ``hash``: a chosen-collision prompt must not be able to
read another request's K/V.

Only the bookkeeping lives here; ``BlockManager`` decides when blocks are taken, freed and published.
A cached block that no sequence uses stays where it is, on an LRU list, until the pool needs it.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Hashable

MAX_DROPPED_IDENTITIES = 1024  # recently dropped identities remembered (see PrefixCache._dropped)


def extend_block_hashes(
    hashes: list[bytes], identity: Hashable, token_ids: list[int], block_size: int, num_blocks: int
) -> None:
    """Appends to ``hashes`` the chain names of blocks ``len(hashes) .. num_blocks - 1`` of ``token_ids``."""
    salt = repr(identity).encode()
    for i in range(len(hashes), num_blocks):
        tokens = array("q", token_ids[i * block_size : (i + 1) * block_size]).tobytes()
        parent = hashes[i - 1] if i else b""
        hashes.append(hashlib.sha256(b"%d|%b|%b|%b" % (len(salt), salt, parent, tokens)).digest())


class PrefixCache:
    """Which block holds which named prefix, and the LRU order of cached blocks no sequence uses."""

    def __init__(self) -> None:
        self._block_of: dict[bytes, int] = {}
        self._name_of: dict[int, tuple[bytes, Hashable]] = {}  # block -> (hash, identity)
        self._by_identity: dict[Hashable, set[int]] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # free cached blocks, oldest first
        # Identities whose weights changed, most recent last: not published again. Only the recent ones
        # matter (a sequence still running on old weights); a name's hash chain includes its identity,
        # so a block published under an old one is never matched anyway, only kept until evicted. Kept
        # bounded: every upload/delete of a new adapter name adds one.
        self._dropped: OrderedDict[Hashable, None] = OrderedDict()

    @property
    def num_evictable(self) -> int:
        return len(self._evictable)

    @property
    def num_cached(self) -> int:
        return len(self._name_of)

    def identities(self) -> set[Hashable]:
        """Whose K/V the cached blocks hold."""
        return set(self._by_identity)

    def lookup(self, hashes: list[bytes]) -> list[int]:
        """The blocks of the longest cached chain that ``hashes`` starts with."""
        blocks = []
        for h in hashes:
            block = self._block_of.get(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def is_evictable(self, block: int) -> bool:
        return block in self._evictable

    def publish(self, block: int, block_hash: bytes, identity: Hashable) -> None:
        """Names ``block`` (fully computed) by ``block_hash``, unless that name is already held by
        another block (two requests computed the same prefix at once: the first one stays)."""
        if block_hash in self._block_of or block in self._name_of or identity in self._dropped:
            return
        self._block_of[block_hash] = block
        self._name_of[block] = (block_hash, identity)
        self._by_identity.setdefault(identity, set()).add(block)

    def take(self, block: int) -> None:
        """A cached block a sequence reuses leaves the LRU list (it is in use again)."""
        self._evictable.pop(block, None)

    def release(self, block: int) -> bool:
        """``block`` is no longer used by any sequence: True if it stays cached (most recently used)."""
        if block not in self._name_of:
            return False
        self._evictable[block] = None
        return True

    def evict(self) -> int | None:
        """Forgets the least recently used cached block nobody uses and returns it (None: none left)."""
        if not self._evictable:
            return None
        block, _ = self._evictable.popitem(last=False)
        self._forget(block)
        return block

    def drop(self, identity: Hashable) -> list[int]:
        """Forgets every block of ``identity`` (its weights changed); returns those nobody uses."""
        self._dropped[identity] = None
        if len(self._dropped) > MAX_DROPPED_IDENTITIES:
            self._dropped.popitem(last=False)
        freed = []
        for block in list(self._by_identity.get(identity, ())):
            self._forget(block)
            if block in self._evictable:
                del self._evictable[block]
                freed.append(block)
        return freed

    def _forget(self, block: int) -> None:
        block_hash, identity = self._name_of.pop(block)
        del self._block_of[block_hash]
        owned = self._by_identity[identity]
        owned.discard(block)
        if not owned:
            del self._by_identity[identity]
