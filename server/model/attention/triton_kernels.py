"""Paged attention kernels in Triton: K/V are read in place through the block table, never gathered.

Cache layout (per layer, K and V alike): ``[num_blocks, block_size, kv_heads, head_dim]``, so the flat
slot ``block * block_size + offset`` of a token indexes ``cache.view(-1, kv_heads, head_dim)``.

* ``store_kv``: one launch writes the step's K and V rows to their slots (negative slots skipped).
* ``paged_decode``: one query row per sequence. One program per (sequence, kv head, split) handles
  every query head of that kv head's group (GQA reads each K/V tile once), over a fixed-size slice of
  the context (``SPLIT`` tokens, aligned to absolute positions, so the partition of a sequence never
  depends on the batch it is in). A second kernel merges the splits in order. Launch sizes come from
  the caller, so a padded CUDA-graph step and an eager one launch identical programs.
* ``paged_prefill``: varlen causal attention over the packed batch in one launch, the cached prefix
  included: program (query block, sequence, head) walks that sequence's blocks up to its causal limit.

Softmax runs in fp32 with exp2; fully masked rows (padding, window edges) produce zeros, not NaNs.
Sliding windows follow transformers: a query at position p sees keys at p - window < k <= p.
Soft-capping is ``cap * tanh(scores / cap)`` after scaling, as in Gemma 2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SPLIT_TOKENS = 256  # context tokens per decode program
DECODE_BLOCK_N = 64  # tokens per inner iteration (SPLIT_TOKENS is a multiple)
LOG2E = 1.4426950408889634


@triton.jit
def _store_kv_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_cs, stride_ch,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Row t, kv head h: cache[slot[t], h, :] = key[h, t, :] (and value); grid (tokens, kv heads)."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        d = tl.arange(0, BLOCK_D)
        mask = d < HEAD_DIM
        k = tl.load(key_ptr + h * stride_kh + t * stride_kt + d, mask=mask)
        v = tl.load(value_ptr + h * stride_vh + t * stride_vt + d, mask=mask)
        dst = slot * stride_cs + h * stride_ch + d
        tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _kv_tile(cache_ptr, table_row_ptr, tokens, valid, kv_head, stride_cs, stride_ch, d, d_mask,
             BLOCK_SIZE: tl.constexpr):  # fmt: skip
    """[len(tokens), BLOCK_D] of one kv head, loaded through the block table (masked rows are 0)."""
    block = tl.load(table_row_ptr + tokens // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    slot = block * BLOCK_SIZE + tokens % BLOCK_SIZE
    ptrs = cache_ptr + slot[:, None] * stride_cs + kv_head * stride_ch + d[None, :]
    return tl.load(ptrs, mask=valid[:, None] & d_mask[None, :], other=0.0)


@triton.jit
def _scores(q, k, scale_log2, softcap, HAS_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
    """q @ k^T, scaled (and soft-capped), in the log2 domain: [rows, tokens] fp32."""
    s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION)
    if HAS_SOFTCAP:
        x = s * (scale_log2 / 1.4426950408889634) / softcap
        s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)) * 1.4426950408889634  # cap * tanh(x)
    else:
        s = s * scale_log2
    return s


@triton.jit
def _online_update(s, m, den, acc, v, PRECISION: tl.constexpr):
    """One tile of online softmax: new running max, denominator and weighted sum (masked = -inf)."""
    m_new = tl.maximum(m, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m - m_safe)
    den = den * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, den, acc


@triton.jit
def _attend(
    q, q_pos, row_mask, k_cache_ptr, v_cache_ptr, table_row, kvh, lo, hi, stride_cs, stride_ch, d, d_mask,
    scale_log2, softcap, window,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    MASK_ROWS: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Online softmax of q's rows over context tokens [lo, hi), read through the block table: returns
    (running max, denominator, weighted sum). ``MASK_ROWS``: per-row causal (and window) masks from
    ``q_pos`` (prefill); otherwise every token of the range is visible to every row (decode)."""
    m = tl.full((ROWS,), float("-inf"), tl.float32)
    den = tl.zeros((ROWS,), tl.float32)
    acc = tl.zeros((ROWS, BLOCK_D), tl.float32)
    for t0 in range(lo, hi, BLOCK_N):
        tokens = t0 + tl.arange(0, BLOCK_N)
        valid = tokens < hi
        k = _kv_tile(k_cache_ptr, table_row, tokens, valid, kvh, stride_cs, stride_ch, d, d_mask, BLOCK_SIZE)
        v = _kv_tile(v_cache_ptr, table_row, tokens, valid, kvh, stride_cs, stride_ch, d, d_mask, BLOCK_SIZE)
        s = _scores(q, k, scale_log2, softcap, HAS_SOFTCAP, PRECISION)
        seen = valid[None, :]
        if MASK_ROWS:
            seen = seen & (tokens[None, :] <= q_pos[:, None]) & row_mask[:, None]
            if HAS_WINDOW:
                seen = seen & (tokens[None, :] > q_pos[:, None] - window)
        m, den, acc = _online_update(tl.where(seen, s, float("-inf")), m, den, acc, v, PRECISION)
    return m, den, acc


@triton.jit
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, table_ptr, ctx_ptr, qstart_ptr, out_ptr, part_acc_ptr, part_ml_ptr,
    stride_qh, stride_qt, stride_cs, stride_ch, stride_bt, stride_ot, stride_oh,
    scale_log2, softcap, window, num_splits,
    GROUP: tl.constexpr, PAD_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DIRECT: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Program (seq, kv head, split): the group's query heads over context tokens
    [split * SPLIT, (split + 1) * SPLIT) clipped to the sequence's visible range."""
    seq, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    ctx = tl.load(ctx_ptr + seq)
    lo = ctx * 0
    if HAS_WINDOW:
        lo = tl.maximum(ctx - window, 0)
    start = tl.maximum(lo, split * SPLIT)
    end = tl.minimum(ctx, (split + 1) * SPLIT)
    if start < end:
        row = tl.load(qstart_ptr + seq).to(tl.int64)
        g = tl.arange(0, PAD_G)
        d = tl.arange(0, BLOCK_D)
        d_mask = d < HEAD_DIM
        heads = kvh * GROUP + g
        g_mask = g < GROUP
        q = tl.load(q_ptr + heads[:, None] * stride_qh + row * stride_qt + d[None, :],
                    mask=g_mask[:, None] & d_mask[None, :], other=0.0)  # fmt: skip
        m, den, acc = _attend(
            q, g, g_mask, k_cache_ptr, v_cache_ptr, table_ptr + seq * stride_bt, kvh, start, end, stride_cs,
            stride_ch, d, d_mask, scale_log2, softcap, window, PAD_G, BLOCK_D, BLOCK_N, BLOCK_SIZE,
            False, HAS_WINDOW, HAS_SOFTCAP, PRECISION,
        )  # fmt: skip
        if DIRECT:
            out = acc / tl.maximum(den, 1e-30)[:, None]
            ptrs = out_ptr + row * stride_ot + heads[:, None] * stride_oh + d[None, :]
            tl.store(ptrs, out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])
        else:
            part = (seq * (GROUP * tl.num_programs(1)) + heads) * num_splits + split
            tl.store(part_acc_ptr + part[:, None] * BLOCK_D + d[None, :], acc, mask=g_mask[:, None])
            tl.store(part_ml_ptr + part * 2, m, mask=g_mask)
            tl.store(part_ml_ptr + part * 2 + 1, den, mask=g_mask)


@triton.jit
def _decode_merge_kernel(
    ctx_ptr, qstart_ptr, out_ptr, part_acc_ptr, part_ml_ptr,
    stride_ot, stride_oh, window, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT: tl.constexpr, HAS_WINDOW: tl.constexpr,
):  # fmt: skip
    """Program (seq, head): merges that head's live splits, in order, into the output row."""
    seq, head = tl.program_id(0), tl.program_id(1)
    ctx = tl.load(ctx_ptr + seq)
    lo = ctx * 0
    if HAS_WINDOW:
        lo = tl.maximum(ctx - window, 0)
    d = tl.arange(0, BLOCK_D)
    m = tl.full((BLOCK_D,), float("-inf"), tl.float32)  # replicated over d: vector loop-carried state
    den = tl.zeros((BLOCK_D,), tl.float32)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    base = (seq * tl.num_programs(1) + head) * num_splits
    for split in range(lo // SPLIT, (ctx + SPLIT - 1) // SPLIT):
        m_s = tl.load(part_ml_ptr + (base + split) * 2)
        l_s = tl.load(part_ml_ptr + (base + split) * 2 + 1)
        acc_s = tl.load(part_acc_ptr + (base + split) * BLOCK_D + d)
        m_new = tl.maximum(m, m_s)
        alpha = tl.exp2(m - m_new)
        beta = tl.exp2(m_s - m_new)
        acc = acc * alpha + acc_s * beta
        den = den * alpha + l_s * beta
        m = m_new
    row = tl.load(qstart_ptr + seq).to(tl.int64)
    out = acc / tl.maximum(den, 1e-30)
    tl.store(
        out_ptr + row * stride_ot + head * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM
    )


@triton.jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, table_ptr, ctx_ptr, qstart_ptr, out_ptr,
    stride_qh, stride_qt, stride_cs, stride_ch, stride_bt, stride_ot, stride_oh,
    scale_log2, softcap, window,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Program (query block, seq, head): causal attention of those new rows over the cached prefix
    and the step's own K/V (already stored), read through the block table."""
    mblk, seq, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(qstart_ptr + seq)
    q_len = tl.load(qstart_ptr + seq + 1) - q_start
    if mblk * BLOCK_M < q_len:
        ctx = tl.load(ctx_ptr + seq)
        rows = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < q_len
        q_pos = ctx - q_len + rows
        d = tl.arange(0, BLOCK_D)
        d_mask = d < HEAD_DIM
        q_rows = (q_start + rows).to(tl.int64)
        q = tl.load(q_ptr + head * stride_qh + q_rows[:, None] * stride_qt + d[None, :],
                    mask=row_mask[:, None] & d_mask[None, :], other=0.0)  # fmt: skip
        kvh = head // GROUP
        hi = tl.minimum(ctx, ctx - q_len + (mblk + 1) * BLOCK_M)  # causal limit of this block
        lo = ctx * 0
        if HAS_WINDOW:
            lo = tl.maximum(ctx - q_len + mblk * BLOCK_M - window + 1, 0)
            lo = (lo // BLOCK_N) * BLOCK_N
        m, den, acc = _attend(
            q, q_pos, row_mask, k_cache_ptr, v_cache_ptr, table_ptr + seq * stride_bt, kvh, lo, hi, stride_cs,
            stride_ch, d, d_mask, scale_log2, softcap, window, BLOCK_M, BLOCK_D, BLOCK_N, BLOCK_SIZE,
            True, HAS_WINDOW, HAS_SOFTCAP, PRECISION,
        )  # fmt: skip
        out = acc / tl.maximum(den, 1e-30)[:, None]
        ptrs = out_ptr + q_rows[:, None] * stride_ot + head * stride_oh + d[None, :]
        tl.store(ptrs, out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


def _common(query: torch.Tensor, k_cache: torch.Tensor, scaling, softcap, window) -> dict:
    head_dim = query.shape[-1]
    return dict(
        scale_log2=(scaling if scaling is not None else head_dim**-0.5) * LOG2E,
        softcap=float(softcap or 1.0),
        window=int(window or 0),
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_SIZE=k_cache.shape[1],
        HAS_WINDOW=window is not None,
        HAS_SOFTCAP=softcap is not None,
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
    )


def store_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:  # fmt: skip
    """key/value [KVH, T, D] (any strides, unit stride on D) -> their slots in the caches."""
    kv_heads, tokens, head_dim = key.shape
    kc, vc = k_cache.view(-1, kv_heads, head_dim), v_cache.view(-1, kv_heads, head_dim)
    _store_kv_kernel[(tokens, kv_heads)](
        key, value, kc, vc, slot_mapping, key.stride(1), key.stride(0), value.stride(1), value.stride(0),
        kc.stride(0), kc.stride(1), HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
    )  # fmt: skip


def paged_decode(out, query, k_cache, v_cache, block_tables, context_lens, query_start, num_seqs: int,
                 num_splits: int, scaling=None, softcap=None, window=None) -> None:  # fmt: skip
    """out [T, H, D] rows ``query_start[s]`` <- attention of query [H, T, D] for ``num_seqs`` one-row
    sequences, with ``num_splits`` context slices of ``SPLIT_TOKENS`` per program column."""
    heads, kv_heads = query.shape[0], k_cache.shape[2]
    group = heads // kv_heads
    kc, vc = k_cache.view(-1, kv_heads, k_cache.shape[3]), v_cache.view(-1, kv_heads, v_cache.shape[3])
    meta = _common(query, k_cache, scaling, softcap, window)
    direct = num_splits == 1
    part_acc = part_ml = out  # unused when direct
    if not direct:
        part_acc = torch.empty(
            num_seqs * heads * num_splits, meta["BLOCK_D"], dtype=torch.float32, device=out.device
        )
        part_ml = torch.empty(num_seqs * heads * num_splits * 2, dtype=torch.float32, device=out.device)
    _decode_split_kernel[(num_seqs, kv_heads, num_splits)](
        query, kc, vc, block_tables, context_lens, query_start, out, part_acc, part_ml,
        query.stride(0), query.stride(1), kc.stride(0), kc.stride(1), block_tables.stride(0),
        out.stride(0), out.stride(1), meta["scale_log2"], meta["softcap"], meta["window"], num_splits,
        GROUP=group, PAD_G=max(16, triton.next_power_of_2(group)), BLOCK_N=DECODE_BLOCK_N, SPLIT=SPLIT_TOKENS,
        DIRECT=direct, **{k: meta[k] for k in ("HEAD_DIM", "BLOCK_D", "BLOCK_SIZE", "HAS_WINDOW",
                                                "HAS_SOFTCAP", "PRECISION")},
    )  # fmt: skip
    if not direct:
        _decode_merge_kernel[(num_seqs, heads)](
            context_lens, query_start, out, part_acc, part_ml, out.stride(0), out.stride(1), meta["window"],
            num_splits, HEAD_DIM=meta["HEAD_DIM"], BLOCK_D=meta["BLOCK_D"], SPLIT=SPLIT_TOKENS,
            HAS_WINDOW=meta["HAS_WINDOW"],
        )  # fmt: skip


def paged_prefill(out, query, k_cache, v_cache, block_tables, context_lens, query_start, num_seqs: int,
                  max_query_len: int, scaling=None, softcap=None, window=None) -> None:  # fmt: skip
    """out [T, H, D] <- causal varlen attention of query [H, T, D]; sequence s owns rows
    ``query_start[s]:query_start[s + 1]``, the last of its ``context_lens[s]`` cached tokens."""
    heads, kv_heads = query.shape[0], k_cache.shape[2]
    kc, vc = k_cache.view(-1, kv_heads, k_cache.shape[3]), v_cache.view(-1, kv_heads, v_cache.shape[3])
    block_m = 16 if max_query_len <= 16 else 64
    _prefill_kernel[(triton.cdiv(max_query_len, block_m), num_seqs, heads)](
        query, kc, vc, block_tables, context_lens, query_start, out,
        query.stride(0), query.stride(1), kc.stride(0), kc.stride(1), block_tables.stride(0),
        out.stride(0), out.stride(1), GROUP=heads // kv_heads, BLOCK_M=block_m, BLOCK_N=64,
        **_common(query, k_cache, scaling, softcap, window),
    )  # fmt: skip
