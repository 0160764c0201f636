"""Paged KV-cache bookkeeping: which fixed-size blocks each sequence owns.

Memory is handed out a block at a time as sequences grow, so nothing is reserved for a request's
maximum length and many more sequences fit than with per-request contiguous buffers.
"""

from __future__ import annotations

from collections import deque

from server.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free_blocks) / self.num_blocks

    def blocks_missing(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks ``seq`` still needs so that ``num_tokens`` tokens fit in its cache."""
        needed = (num_tokens + self.block_size - 1) // self.block_size
        return max(0, needed - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_missing(seq, num_tokens) <= len(self.free_blocks)

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        missing = self.blocks_missing(seq, num_tokens)
        if missing > len(self.free_blocks):
            raise RuntimeError("allocate() called without can_allocate()")
        for _ in range(missing):
            seq.block_table.append(self.free_blocks.popleft())

    def free(self, seq: Sequence) -> None:
        self.free_blocks.extend(seq.block_table)
        seq.block_table = []
