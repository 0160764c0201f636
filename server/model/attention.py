"""Paged attention plugged into Hugging Face models through transformers' attention interface.

The HF model keeps its own projections, RoPE and norms; only the attention core is ours. We call
the model on a *packed* batch ([1, T] tokens of many sequences back to back) with
``past_key_values=None`` and pass an ``AttentionMetadata`` in the forward kwargs, which transformers
hands through to this function. Here each layer writes the new K/V into the engine-owned paged
cache and attends each sequence's queries to its own cached context.

Decode rows (one query each) are done in one batched SDPA call over their gathered blocks;
prefill chunks are done one call per sequence (a causal mask offset by the cached prefix).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

BACKEND_NAME = "loraplex_paged"


@dataclass
class PrefillChunk:
    start: int  # first token of the chunk in the packed batch
    end: int
    context_len: int  # tokens in the cache after this chunk (cached prefix + chunk)
    block_table: torch.Tensor  # [num_blocks] int64


@dataclass
class AttentionMetadata:
    """Everything attention needs for one step; built once per step, shared by all layers."""

    kv_caches: list[torch.Tensor]  # per layer [2, num_blocks, block_size, kv_heads, head_dim]
    slot_mapping: torch.Tensor  # [T] flat cache slot of every new token
    prefills: list[PrefillChunk]
    decode_token_idx: torch.Tensor | None  # [Bd] packed positions of decode rows
    decode_block_tables: torch.Tensor | None  # [Bd, max_blocks] (padded with block 0)
    decode_mask: torch.Tensor | None  # [Bd, 1, 1, max_blocks * block_size] bool, True where valid
    decode_positions: torch.Tensor | None = None  # [Bd] query positions, for sliding windows


def _sdpa(q, k, v, mask, scaling, is_causal, softcap):
    """q [B, H, Q, D], k/v [B, KVH, L, D]; grouped-query heads share K/V without copies."""
    groups = q.shape[1] // k.shape[1]
    if softcap is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, scale=scaling, enable_gqa=groups > 1
        )
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scaling
    scores = torch.tanh(scores / softcap) * softcap
    if is_causal:
        n_q, n_k = q.shape[-2], k.shape[-2]
        mask = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(n_k - n_q)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    attn_meta: AttentionMetadata | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query [1, H, T, D], key/value [1, KVH, T, D] -> ([1, T, H, D], None)."""
    if attn_meta is None:
        raise RuntimeError("loraplex attention called without attn_meta (the engine builds it)")
    cache = attn_meta.kv_caches[module.layer_idx]
    num_kv_heads, head_dim = key.shape[1], key.shape[3]
    k_new = key[0].transpose(0, 1)  # [T, KVH, D]
    v_new = value[0].transpose(0, 1)
    k_flat = cache[0].view(-1, num_kv_heads, head_dim)
    v_flat = cache[1].view(-1, num_kv_heads, head_dim)
    k_flat.index_copy_(0, attn_meta.slot_mapping, k_new)
    v_flat.index_copy_(0, attn_meta.slot_mapping, v_new)

    q_all = query[0]  # [H, T, D]
    out = torch.empty_like(q_all.transpose(0, 1))  # [T, H, D]

    for chunk in attn_meta.prefills:
        q = q_all[:, chunk.start : chunk.end].unsqueeze(0)
        n = chunk.end - chunk.start
        if chunk.context_len == n and sliding_window is None:
            k = key[:, :, chunk.start : chunk.end]
            v = value[:, :, chunk.start : chunk.end]
            o = _sdpa(q, k, v, None, scaling, True, softcap)
        else:
            slots = _context_slots(chunk.block_table, chunk.context_len, cache.shape[2])
            k = k_flat.index_select(0, slots).transpose(0, 1).unsqueeze(0)
            v = v_flat.index_select(0, slots).transpose(0, 1).unsqueeze(0)
            q_pos = torch.arange(chunk.context_len - n, chunk.context_len, device=q.device)
            k_pos = torch.arange(chunk.context_len, device=q.device)
            mask = k_pos[None, :] <= q_pos[:, None]
            if sliding_window is not None:
                mask &= k_pos[None, :] > q_pos[:, None] - sliding_window
            o = _sdpa(q, k, v, mask, scaling, False, softcap)
        out[chunk.start : chunk.end] = o[0].transpose(0, 1)

    if attn_meta.decode_token_idx is not None:
        idx = attn_meta.decode_token_idx
        q = q_all.index_select(1, idx).transpose(0, 1).unsqueeze(2)  # [Bd, H, 1, D]
        tables = attn_meta.decode_block_tables
        rows, width = tables.shape[0], tables.shape[1] * cache.shape[2]
        # Whole blocks are gathered (contiguous copies; index_select is several times faster than
        # advanced indexing on CPU), then padding keys are masked out.
        flat_tables = tables.flatten()
        k = cache[0].index_select(0, flat_tables).view(rows, width, num_kv_heads, head_dim).transpose(1, 2)
        v = cache[1].index_select(0, flat_tables).view(rows, width, num_kv_heads, head_dim).transpose(1, 2)
        mask = attn_meta.decode_mask
        if sliding_window is not None:
            key_pos = torch.arange(width, device=q.device)
            window = key_pos[None, :] > (attn_meta.decode_positions[:, None] - sliding_window)
            mask = mask & window[:, None, None, :]
        o = _sdpa(q, k, v, mask, scaling, False, softcap)  # [Bd, H, 1, D]
        out.index_copy_(0, idx, o.squeeze(2))
    return out.unsqueeze(0), None


def _context_slots(block_table: torch.Tensor, context_len: int, block_size: int) -> torch.Tensor:
    offsets = torch.arange(context_len, device=block_table.device)
    return block_table[offsets // block_size] * block_size + offsets % block_size


def _no_mask(*args, **kwargs):
    """Masks are implied by the packed layout and built inside the attention function."""
    return None


def register_attention_backend() -> str:
    """Registers the backend under BACKEND_NAME (idempotent) and returns the name."""
    AttentionInterface.register(BACKEND_NAME, paged_attention_forward)
    AttentionMaskInterface.register(BACKEND_NAME, _no_mask)
    return BACKEND_NAME
