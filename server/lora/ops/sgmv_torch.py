"""Reference SGMV in plain torch: one pair of in-place matmuls per segment, nothing per base row."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from server.lora.batch import LoRABatch


def sgmv_torch(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a_stacked: torch.Tensor,
    lora_b_stacked: torch.Tensor,
    batch: LoRABatch,
    ranks: Sequence[int] | None = None,
) -> None:
    """``y[s:e] += x[s:e] @ A[slot, :r].T @ B[slot, :, :r].T`` per segment (see ``ops.add_lora``).

    Views only: slicing to the slot's live rank keeps a rank-4 adapter as cheap as rank 4 even in
    rank-64 buffers, and ``addmm_`` on the output view writes the delta without a temporary of y.
    """
    max_rank = lora_a_stacked.shape[1]
    for start, end, slot in batch.segments:
        r = max_rank if ranks is None else ranks[slot]
        if r == 0:
            continue
        shrunk = torch.mm(x[start:end], lora_a_stacked[slot, :r].t())
        y[start:end].addmm_(shrunk, lora_b_stacked[slot, :, :r].t())
