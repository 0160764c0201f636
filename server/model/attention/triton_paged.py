"""Paged attention with Triton kernels that read K/V through the block table (``triton_kernels``).

Pure decode steps (one new token per sequence) run the split-context decode kernel; any step with
a longer chunk runs the varlen causal kernel over the whole packed batch (its decode rows included),
in one launch. ``plan`` only picks launch sizes: for a ``static`` layout (a decode step padded to a
graph bucket) they come from the bucket and the block-table width, never from this step's lengths,
so one captured graph per bucket replays every later step. Runs on CUDA, and on the CPU under
Triton's interpreter (``TRITON_INTERPRET=1``) for tests.
"""

from __future__ import annotations

import torch

from server.model.attention.base import AttentionBackend, StepLayout, UnsupportedModelError
from server.model.attention.triton_kernels import SPLIT_TOKENS, paged_decode, paged_prefill, store_kv

MAX_HEAD_DIM = 256


class TritonPagedAttention(AttentionBackend):
    """Cache layout per layer: [2 (K, V), num_blocks, block_size, kv_heads, head_dim]."""

    name = "triton"
    supports_cuda_graphs = True

    def check_model(self, geometry) -> None:
        if geometry.head_dim > MAX_HEAD_DIM:
            raise UnsupportedModelError(
                f"attention backend 'triton' supports head_dim <= {MAX_HEAD_DIM}, the model has {geometry.head_dim}"
            )

    def plan(self, layout: StepLayout) -> None:
        self.layout = layout
        if layout.is_decode:
            width = layout.device.block_tables.shape[1] * layout.block_size
            longest = width if layout.static else layout.max_context_len
            self.num_splits = max(1, -(-longest // SPLIT_TOKENS))

    def forward(self, layer_idx, query, key, value, scaling, sliding_window, softcap) -> torch.Tensor:
        layout = self.layout
        cache = self.kv_caches[layer_idx]
        meta = layout.device
        store_kv(_unit_stride(key[0]), _unit_stride(value[0]), cache[0], cache[1], meta.slot_mapping)
        q = _unit_stride(query[0])  # [H, T, D]
        out = torch.empty(q.shape[1], q.shape[0], q.shape[2], dtype=q.dtype, device=q.device)  # [T, H, D]
        args = (
            out,
            q,
            cache[0],
            cache[1],
            meta.block_tables,
            meta.context_lens,
            meta.query_start,
            layout.num_seqs,
        )
        if layout.is_decode:
            paged_decode(*args, self.num_splits, scaling, softcap, sliding_window)
        else:
            paged_prefill(*args, layout.max_query_len, scaling, softcap, sliding_window)
        return out.unsqueeze(0)


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    """The kernels index the head dimension directly; anything else is copied once."""
    return t if t.stride(-1) == 1 else t.contiguous()
