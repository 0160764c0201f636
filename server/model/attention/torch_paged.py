"""Paged attention in plain torch: the reference backend, and the fast one on CPU.

Decode rows (one query each) are done in one call per layer: on CPU a native kernel
(``csrc/paged_attention_cpu.cpp``, built at start-up by ``server.native``) reads the keys and values
straight from the cache through the block tables, the heads that share a KV head together, with an
online softmax; elsewhere (or where it cannot be built) one batched SDPA over their gathered blocks.
Prefill chunks take one SDPA call per sequence (a causal mask offset by the cached prefix): they are
few per step and large, so that call runs at the GEMM rate. Gathering whole blocks with
``index_select`` is several times faster than advanced indexing on CPU; on CUDA the Triton and
FlashInfer backends read the cache through the block table instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from server.model.attention.base import AttentionBackend, StepLayout
from server.native import load_kernel

NATIVE_SOURCE = Path(__file__).parent / "csrc" / "paged_attention_cpu.cpp"


@dataclass
class _PrefillChunk:
    start: int  # first row of the chunk in the packed batch
    end: int
    context_len: int  # tokens in the cache after this chunk (cached prefix + chunk)
    block_table: torch.Tensor  # [num_blocks] int64


@dataclass
class _DecodeBatch:
    rows: torch.Tensor  # [Bd] int32 packed rows of the decode queries
    block_tables: torch.Tensor  # [Bd, max_blocks] int32, padded with stale entries
    context_lens: torch.Tensor  # [Bd] int32 keys each query attends to
    mask: torch.Tensor | None = None  # [Bd, 1, 1, max_blocks * block_size], True on real keys (SDPA path)

    def key_mask(self, block_size: int) -> torch.Tensor:
        """Built on first use: only the SDPA path needs it."""
        if self.mask is None:
            key_pos = torch.arange(self.block_tables.shape[1] * block_size, device=self.block_tables.device)
            self.mask = (key_pos[None, :] < self.context_lens[:, None])[:, None, None, :]
        return self.mask


MAX_NATIVE_GROUP = 16  # query heads per KV head the kernel handles


def native_decode_supported(head_dim: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the native decode kernel serves this model here (it builds it on the first call)."""
    if (
        device.type != "cpu"
        or dtype not in (torch.float32, torch.bfloat16)
        or head_dim % 16
        or head_dim > 256
    ):
        return False
    fakes = ("loraplex_attention_cpu::paged_decode", "loraplex_attention_cpu::store_kv")
    return load_kernel("loraplex_paged_attention_cpu", NATIVE_SOURCE, fakes=fakes)


def sdpa(q, k, v, mask, scaling, is_causal, softcap):
    """q [B, H, Q, D], k/v [B, KVH, L, D]; grouped-query heads share K/V without copies."""
    groups = q.shape[1] // k.shape[1]
    if softcap is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, scale=scaling, enable_gqa=groups > 1
        )
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) * (scaling if scaling is not None else q.shape[-1] ** -0.5)
    scores = torch.tanh(scores / softcap) * softcap
    if is_causal:
        n_q, n_k = q.shape[-2], k.shape[-2]
        mask = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(n_k - n_q)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


class TorchPagedAttention(AttentionBackend):
    """Cache layout per layer: [2 (K, V), num_blocks, block_size, kv_heads, head_dim]."""

    name = "torch"

    def allocate_kv_cache(self, dtype: torch.dtype) -> list[torch.Tensor]:
        self.native_decode = native_decode_supported(self.geometry.head_dim, dtype, self.device)
        # A padded decode step plans from the persistent step buffers and runs the same native calls
        # every step: what a compiled decode (or a graph) needs.
        self.supports_cuda_graphs = self.native_decode
        return super().allocate_kv_cache(dtype)

    def plan(self, layout: StepLayout) -> None:
        device = self.device
        self.slot_mapping = layout.device.slot_mapping[: layout.num_tokens]  # int32
        if layout.is_decode and self.native_decode:  # the step buffers are the kernel's inputs as they are
            n, host = layout.num_seqs, layout.host
            self.prefills = []
            self.decode = _DecodeBatch(host.query_start[:n], host.block_tables[:n], host.context_lens[:n])
            return
        self.prefills = [
            _PrefillChunk(
                s.start,
                s.start + s.num_tokens,
                s.context_len,
                torch.tensor(s.block_table, dtype=torch.long, device=device),
            )
            for s in layout.spans
            if s.num_tokens > 1
        ]
        decodes = [s for s in layout.spans if s.num_tokens == 1]
        self.decode = self._plan_decode(decodes) if decodes else None

    def _plan_decode(self, spans) -> _DecodeBatch:
        max_blocks = max(len(s.block_table) for s in spans)
        padded = [s.block_table + [0] * (max_blocks - len(s.block_table)) for s in spans]
        ints = {"dtype": torch.int32, "device": self.device}
        return _DecodeBatch(
            rows=torch.tensor([s.start for s in spans], **ints),
            block_tables=torch.tensor(padded, **ints),
            context_lens=torch.tensor([s.context_len for s in spans], **ints),
        )

    def forward(self, layer_idx, query, key, value, scaling, sliding_window, softcap) -> torch.Tensor:
        cache = self.kv_caches[layer_idx]
        k_flat = cache[0].view(-1, *cache.shape[3:])
        v_flat = cache[1].view(-1, *cache.shape[3:])
        self._store_kv(cache, k_flat, v_flat, key[0].transpose(0, 1), value[0].transpose(0, 1))
        q_all = query[0]  # [H, T, D]
        out = torch.empty_like(q_all.transpose(0, 1))  # [T, H, D]
        for chunk in self.prefills:
            out[chunk.start : chunk.end] = self._prefill(chunk, q_all, key, value, k_flat, v_flat,
                                                         scaling, sliding_window, softcap)  # fmt: skip
        native = self.native_decode and q_all.shape[0] // cache.shape[3] <= MAX_NATIVE_GROUP
        if self.decode is not None and native:
            scale = scaling if scaling is not None else q_all.shape[-1] ** -0.5
            torch.ops.loraplex_attention_cpu.paged_decode(
                out, q_all.transpose(0, 1), cache, self.decode.rows, self.decode.block_tables,
                self.decode.context_lens, scale, softcap or 0.0, sliding_window or 0,
            )  # fmt: skip
        elif self.decode is not None:
            out.index_copy_(
                0, self.decode.rows.long(), self._decode(cache, q_all, scaling, sliding_window, softcap)
            )
        return out.unsqueeze(0)

    def _store_kv(self, cache, k_flat, v_flat, k_rows, v_rows) -> None:
        """This step's K/V rows [T, KVH, D] into their cache slots: one native call (in place, also
        under torch.compile) when the rows have the usual layout, else two ``index_copy_``."""
        if self.native_decode and all(
            t.stride(2) == 1 and t.stride(1) == t.shape[2] for t in (k_rows, v_rows)
        ):
            torch.ops.loraplex_attention_cpu.store_kv(cache, k_rows, v_rows, self.slot_mapping)
            return
        slots = self.slot_mapping.long()
        k_flat.index_copy_(0, slots, k_rows)
        v_flat.index_copy_(0, slots, v_rows)

    def _prefill(self, chunk, q_all, key, value, k_flat, v_flat, scaling, sliding_window, softcap):
        """One sequence's chunk attending to its cached prefix and itself, causally: [n, H, D]."""
        q = q_all[:, chunk.start : chunk.end].unsqueeze(0)
        n = chunk.end - chunk.start
        if chunk.context_len == n and sliding_window is None:  # no cached prefix: the new K/V suffice
            k = key[:, :, chunk.start : chunk.end]
            v = value[:, :, chunk.start : chunk.end]
            return sdpa(q, k, v, None, scaling, True, softcap)[0].transpose(0, 1)
        offsets = torch.arange(chunk.context_len, device=q.device)
        slots = chunk.block_table[offsets // self.block_size] * self.block_size + offsets % self.block_size
        k = k_flat.index_select(0, slots).transpose(0, 1).unsqueeze(0)
        v = v_flat.index_select(0, slots).transpose(0, 1).unsqueeze(0)
        q_pos = offsets[chunk.context_len - n :]
        mask = offsets[None, :] <= q_pos[:, None]
        if sliding_window is not None:
            mask &= offsets[None, :] > q_pos[:, None] - sliding_window
        return sdpa(q, k, v, mask, scaling, False, softcap)[0].transpose(0, 1)

    def _decode(self, cache, q_all, scaling, sliding_window, softcap) -> torch.Tensor:
        """All decode rows in one SDPA over their whole gathered blocks, padding masked: [Bd, H, D]."""
        batch = self.decode
        q = q_all.index_select(1, batch.rows).transpose(0, 1).unsqueeze(2)  # [Bd, H, 1, D]
        rows, width = batch.block_tables.shape[0], batch.block_tables.shape[1] * self.block_size
        flat_tables = batch.block_tables.flatten()
        kv_shape = (rows, width, *cache.shape[3:])
        k = cache[0].index_select(0, flat_tables).view(kv_shape).transpose(1, 2)
        v = cache[1].index_select(0, flat_tables).view(kv_shape).transpose(1, 2)
        mask = batch.key_mask(self.block_size)
        if sliding_window is not None:
            key_pos = torch.arange(width, device=q.device)
            window = key_pos[None, :] > (batch.context_lens[:, None] - 1 - sliding_window)
            mask = mask & window[:, None, None, :]
        return sdpa(q, k, v, mask, scaling, False, softcap).squeeze(2)
