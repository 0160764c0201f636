"""Paged KV-cache bookkeeping: which fixed-size blocks each sequence owns, and which it shares.

Memory is handed out a block at a time as sequences grow, so nothing is reserved for a request's
maximum length and many more sequences fit than with per-request contiguous buffers.

With prefix caching a block is refcounted: full blocks whose K/V are computed are published under
their hash chain (``prefix_cache.py``), a new sequence starts on the longest cached chain of its own
blocks, and a freed block that is cached stays on an LRU list until the pool needs it. New blocks
come from never-cached free blocks first, then from the least recently used cached ones; a block in
use by any sequence is never taken.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable

from server.engine.prefix_cache import PrefixCache, extend_block_hashes
from server.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = False) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))  # free and holding no cached prefix
        self.ref_counts = [0] * num_blocks
        self.cache = PrefixCache() if enable_caching else None
        self.num_queried_tokens = 0  # lifetime: prompt tokens looked up in the prefix cache
        self.num_hit_tokens = 0  # ... and found there

    @property
    def num_free_blocks(self) -> int:
        """Blocks a sequence can get now: free ones and cached ones nobody uses."""
        return len(self.free_blocks) + self.num_cached_free_blocks

    @property
    def num_cached_free_blocks(self) -> int:
        return self.cache.num_evictable if self.cache is not None else 0

    @property
    def usage(self) -> float:
        """Fraction of blocks in use by sequences (cached-but-free ones are not)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def cached_free_usage(self) -> float:
        return self.num_cached_free_blocks / self.num_blocks

    def blocks_missing(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks ``seq`` still needs so that ``num_tokens`` tokens fit in its cache."""
        needed = (num_tokens + self.block_size - 1) // self.block_size
        return max(0, needed - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_missing(seq, num_tokens) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        missing = self.blocks_missing(seq, num_tokens)
        if missing > self.num_free_blocks:
            raise RuntimeError("allocate() called without can_allocate()")
        for _ in range(missing):
            block = self.free_blocks.popleft() if self.free_blocks else self.cache.evict()
            self.ref_counts[block] = 1
            seq.block_table.append(block)

    def free(self, seq: Sequence) -> None:
        """Drops ``seq``'s hold on its blocks. Its tail goes first, so the cached blocks freed here are
        evicted last-block-first and a shared prefix outlives the suffixes that hang off it."""
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0 and not (self.cache is not None and self.cache.release(block)):
                self.free_blocks.append(block)
        seq.block_table = []
        seq.num_registered_blocks = 0

    # --- prefix caching ---------------------------------------------------------------------
    def cached_prefix(self, seq: Sequence, identity: Hashable) -> list[int]:
        """The cached blocks ``seq`` (waiting, no blocks) can start on when it runs with the weights
        named ``identity`` (None: the base model).

        At most ``(len - 1) // block_size`` blocks: the last token is always computed, since its logits
        are what the first new token is sampled from. None at all while the request still needs its
        prompt's logprobs.
        """
        if self.cache is None:
            return []
        if identity != seq.cache_identity:  # first admission, or reloaded while it was preempted
            seq.cache_identity, seq.block_hashes = identity, []
        if seq.params.prompt_logprobs and len(seq.prompt_logprobs) < seq.num_prompt_tokens - 1:
            return []  # its prompt's logprobs come from computing the prompt (vLLM does the same)
        usable = (len(seq) - 1) // self.block_size
        extend_block_hashes(seq.block_hashes, seq.cache_identity, seq.token_ids, self.block_size, usable)
        return self.cache.lookup(seq.block_hashes[:usable])

    def can_admit(self, seq: Sequence, prefix: list[int], num_tokens: int) -> bool:
        """Whether ``seq`` can start on ``prefix`` and hold ``num_tokens`` tokens in all."""
        needed = (num_tokens + self.block_size - 1) // self.block_size - len(prefix)
        taken_from_free = sum(1 for b in prefix if self.ref_counts[b] == 0)  # cached, nobody used them
        return needed <= self.num_free_blocks - taken_from_free

    def admit(self, seq: Sequence, prefix: list[int], num_tokens: int) -> None:
        """Starts ``seq`` on the cached ``prefix`` (its K/V count as computed) and allocates the rest."""
        for block in prefix:
            if self.ref_counts[block] == 0:
                self.cache.take(block)
            self.ref_counts[block] += 1
        seq.block_table = list(prefix)
        seq.num_registered_blocks = len(prefix)
        seq.num_computed_tokens = len(prefix) * self.block_size
        if seq.num_cached_tokens is None:  # its first admission: what the client is told, and metrics
            seq.num_cached_tokens = seq.num_computed_tokens
            if self.cache is not None:
                self.num_queried_tokens += seq.num_prompt_tokens
                self.num_hit_tokens += seq.num_computed_tokens
        self.allocate(seq, num_tokens)

    def publish(self, seq: Sequence) -> None:
        """Publishes ``seq``'s blocks that became full and computed in this step."""
        if self.cache is None:
            return
        full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        if full <= seq.num_registered_blocks:
            return
        extend_block_hashes(seq.block_hashes, seq.cache_identity, seq.token_ids, self.block_size, full)
        for i in range(seq.num_registered_blocks, full):
            self.cache.publish(seq.block_table[i], seq.block_hashes[i], seq.cache_identity)
        seq.num_registered_blocks = full

    def drop(self, identity: Hashable) -> None:
        """The weights behind ``identity`` changed: its cached blocks are forgotten (the unused ones
        freed now, the used ones when their sequences end) and none is published under it again."""
        if self.cache is not None:
            self.free_blocks.extend(self.cache.drop(identity))
