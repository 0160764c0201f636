"""Reference SGMV in plain torch; base-model rows never enter any matmul.

Two exact strategies, picked per call from the batch shape:

* per segment: one pair of in-place matmuls on views per segment. Best when segments are long
  (prefill): no copies, and a rank-4 adapter in rank-64 buffers costs rank 4.
* per slot group: when every slot has only a few rows (decode), a loop of tiny matmuls is all
  Python/dispatch overhead, so the rows are viewed as a [slots, width, in] block and run through one
  ``bmm`` + one ``baddbmm_`` over the slot range. When the engine's sorted batch already has that
  layout (same row count per slot, in slot order; e.g. round-robin decode) this is copy-free;
  otherwise the rows are gathered into a zero-padded block and scattered back with ``index_add_``.
  Weights are read through views (no gather); ranks are cut to the largest live one in the range.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from server.lora.batch import LoRABatch, SlotGroups

# Grouped path only when each slot has at most this many rows (padding waste stays small) and the
# slot range is dense enough that empty groups in it do not dominate.
GROUPED_MAX_ROWS_PER_SLOT = 32
GROUPED_MAX_RANGE_FACTOR = 2


def sgmv_torch(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a_stacked: torch.Tensor,
    lora_b_stacked: torch.Tensor,
    batch: LoRABatch,
    ranks: Sequence[int] | None = None,
) -> None:
    """``y[s:e] += (x[s:e] @ A[slot, :, :r]) @ B[slot, :r]`` per segment (see ``LoRABackend.sgmv``)."""
    segments = batch.segments
    if not segments:
        return
    if len(segments) > 1:
        groups = batch.slot_groups(x.device)
        num_slots = len({slot for _, _, slot in segments})
        padded_ok = groups.width <= GROUPED_MAX_ROWS_PER_SLOT
        if groups.dense or (padded_ok and groups.hi - groups.lo + 1 <= GROUPED_MAX_RANGE_FACTOR * num_slots):
            _grouped(y, x, lora_a_stacked, lora_b_stacked, groups, ranks)
            return
    max_rank = lora_a_stacked.shape[2]
    for start, end, slot in segments:
        r = max_rank if ranks is None else ranks[slot]
        if r == 0:
            continue
        shrunk = torch.mm(x[start:end], lora_a_stacked[slot, :, :r])
        y[start:end].addmm_(shrunk, lora_b_stacked[slot, :r])


def _grouped(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a_stacked: torch.Tensor,
    lora_b_stacked: torch.Tensor,
    groups: SlotGroups,
    ranks: Sequence[int] | None,
) -> None:
    lo, hi, width = groups.lo, groups.hi, groups.width
    r = lora_a_stacked.shape[2] if ranks is None else max(ranks[lo : hi + 1])
    if r == 0:
        return
    num_groups, d_in, d_out = hi - lo + 1, x.shape[1], y.shape[1]
    a_t = lora_a_stacked[lo : hi + 1, :, :r]  # [G, in, r] view
    b_t = lora_b_stacked[lo : hi + 1, :r]  # [G, r, out] view
    if groups.dense:
        rows = slice(groups.first_row, groups.first_row + num_groups * width)
        shrunk = torch.bmm(x[rows].view(num_groups, width, d_in), a_t)
        y[rows].view(num_groups, width, d_out).baddbmm_(shrunk, b_t)
        return
    padded = x.new_zeros(num_groups * width, d_in)
    padded.index_copy_(0, groups.padded, x.index_select(0, groups.rows))
    delta = torch.bmm(torch.bmm(padded.view(num_groups, width, d_in), a_t), b_t)
    y.index_add_(0, groups.rows, delta.view(-1, d_out).index_select(0, groups.padded))
