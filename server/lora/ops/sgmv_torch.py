"""SGMV in plain torch: the reference op, and the portable fallback.

Semantics, for every LoRA row ``i`` of the step (slot ``s``; base rows have none) and every member
``j`` of the target (one linear, or a fused q/k/v or gate/up group)::

    y[i, cols_j] += (x[i] @ A_j[s, :, :r]) @ b[s, :r, cols_j]

Shapes: ``y`` [N, sum(out)], ``x`` [N, in]; ``SlotWeights`` holds pages of one rank block, ``a``
[pages, in, members, 16] and ``b`` [pages, 16, sum(out)], and the page table ``pt`` [slots, R/16]:
``A_j[s, :, q] = a[pt[s, q // 16], :, j, q % 16]``, ``B[s, q] = b[pt[s, q // 16], q % 16]``; ``r`` is
the step's live rank (a multiple of 16).

All slots go through one ``grouped_mm`` per stage whatever the rows per slot (the rows are grouped
by slot once per step, ``SlotRows``): one shrink per live rank block for the whole fused group (a
block of its members' A is one contiguous matrix), then one expand per member into its column
slice. No Python loop over segments, no padding to ``max_lora_rank``, base rows never enter a
matmul. Where ``grouped_mm`` is missing (torch < 2.9) the groups are looped in Python.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from server.lora.batch import SlotRows
from server.lora.slot_weights import RANK_BLOCK, SlotWeights

_HAS_GROUPED_MM = hasattr(F, "grouped_mm")


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, ends: list[int] | None = None):
    """``out[rows of group g] = x[rows of group g] @ w[g]``; group g ends at ``offsets[g]``."""
    if _HAS_GROUPED_MM:
        return F.grouped_mm(x, w, offs=offsets)
    out = x.new_empty(x.shape[0], w.shape[2])
    start = 0
    for g, end in enumerate(ends if ends is not None else offsets.tolist()):
        torch.mm(x[start:end], w[g], out=out[start:end])
        start = end
    return out


def sgmv_torch(y: torch.Tensor, x: torch.Tensor, weights: SlotWeights, rows: SlotRows) -> None:
    """Adds every LoRA row's delta into ``y`` in place (see the module docstring)."""
    r = weights.live_rank(rows.live_slots)
    if r == 0:
        return
    lo, hi, members = rows.lo, rows.hi, weights.num_members
    ends = None if _HAS_GROUPED_MM else rows.offsets.tolist()
    xs = rows.take(x)
    pages = weights.page_table[lo : hi + 1, : r // RANK_BLOCK]  # [G, blocks]
    blocks = weights.a[pages].flatten(-2)  # [G, blocks, in, members * 16]
    b = weights.b[pages].flatten(1, 2)  # [G, r, sum(out)]
    if blocks.dtype != x.dtype:  # half-width slots under a float32 model: computed in fp32
        blocks, b = blocks.to(x.dtype), b.to(x.dtype)
    parts = [grouped_mm(xs, blocks[:, k], rows.offsets, ends) for k in range(blocks.shape[1])]
    shrunk = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
    if members > 1:  # [M, blocks, members, 16] -> [M, members, blocks, 16]: each member's ranks together
        shrunk = (
            shrunk.view(-1, r // RANK_BLOCK, members, RANK_BLOCK).transpose(1, 2).reshape(-1, members * r)
        )
    for j, cols in enumerate(weights.slices):
        delta = grouped_mm(shrunk[:, j * r : (j + 1) * r], b[:, :, cols], rows.offsets, ends)
        rows.add_into(y[:, cols], delta)
